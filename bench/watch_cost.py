#!/usr/bin/env python3
"""What a watch rule costs: time and CPU per run, next to the same question sent as a request.

    .venv/bin/python bench/watch_cost.py [--seconds 30] [--model tiny-vision|PATH] [--json]

A private mosquitto and the agent as a process (tests/support.py), one continuous camera on a
still 640x480 15 fps clip, the tiny vision model on real ORT GenAI. Three phases of --seconds
each, one after the other on the same agent settings:

1. idle: the camera and no rule, the baseline CPU of the daemon and its inference child;
2. rule: one rule every 1 s, publish = "always", max_tokens 8: runs, the run's own timings
   (from its published state) and CPU per run over the baseline;
3. requests: the same question and camera sent as a request once a second: the same figures,
   so that a rule run's overhead over a request shows.

CPU: utime + stime of the daemon and its child from /proc, per wall second. Results are printed
and appended to bench/WATCH.md unless --no-append.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import AgentProcess, Broker, Client, build_model, collect, file_camera  # noqa: E402
from video import make_still_clip  # noqa: E402

QUESTION = "Is the door open?"
TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for member in [pid, *map(int, children)]:
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def phase(agent: AgentProcess, seconds: float, act: Any) -> tuple[float, list[dict[str, Any]]]:
    """CPU seconds per wall second over the phase, and what `act` collected."""
    assert agent.proc is not None
    cpu0, wall0 = tree_cpu_s(agent.proc.pid), time.monotonic()
    docs = act(seconds)
    return (tree_cpu_s(agent.proc.pid) - cpu0) / (time.monotonic() - wall0), docs


def summary(name: str, cpu_per_s: float, idle_per_s: float, docs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    total = [d["timings"]["total_ms"] for d in docs if d.get("timings")]
    runs = len(total)
    return {"phase": name, "runs": runs, "cpu_percent": round(100 * cpu_per_s, 2),
            "cpu_ms_per_run": round(1000 * (cpu_per_s - idle_per_s) * seconds / runs, 1) if runs else None,
            "total_ms_p50": round(statistics.median(total), 1) if total else None,
            "total_ms_max": round(max(total), 1) if total else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--model", default="tiny-vision")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    model = Path(args.model) if Path(args.model).is_dir() else build_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="watch-bench-"))
    clip = make_still_clip(work / "still.avi", seconds=4)
    broker = Broker()
    broker.start()
    client = Client(broker.port)
    results = []
    try:
        base = {"images__longest_side": 336, "cameras": {"yard": file_camera(clip)}, "stats_interval_s": 0}
        idle_agent = AgentProcess(work, broker.port, model, **base)
        idle_agent.start(client)
        time.sleep(3)  # the camera settles
        idle, _ = phase(idle_agent, args.seconds, lambda s: time.sleep(s) or [])
        results.append(summary("idle", idle, idle, [], args.seconds))

        def requests(seconds: float) -> list[dict[str, Any]]:
            client.subscribe(idle_agent.response_topic)
            answers, deadline = [], time.monotonic() + seconds
            while time.monotonic() < deadline:
                rid = uuid.uuid4().hex
                client.publish(idle_agent.request_topic, json.dumps(
                    {"id": rid, "camera": "yard", "prompt": QUESTION, "max_tokens": 8}))
                answers.append(client.wait_for(lambda d: d.get("id") == rid, 60))
                time.sleep(max(0.0, 1.0 - answers[-1]["timings"]["total_ms"] / 1000))
            return answers

        cpu, docs = phase(idle_agent, args.seconds, requests)
        results.append(summary("requests", cpu, idle, docs, args.seconds))
        idle_agent.stop()

        rule_agent = AgentProcess(work, broker.port, model, **base, watch={"door": {
            "camera": "yard", "prompt": QUESTION, "every_s": 1, "max_tokens": 8, "publish": "always"}})
        rule_agent.start(client)
        time.sleep(3)
        topic = f"{rule_agent.prefix}/{rule_agent.device_id}/watch/door"
        client.subscribe(topic)
        collect(client, 0.5)
        cpu, docs = phase(rule_agent, args.seconds, lambda s: [
            json.loads(p) for _, t, p in collect(client, s) if t == topic and p])
        results.append(summary("rule", cpu, idle, docs, args.seconds))
        rule_agent.stop()
    finally:
        client.close()
        broker.close()
    report(results, args, model)
    return 0


def report(results: list[dict[str, Any]], args: argparse.Namespace, model: Path) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
    lines = [f"\n## {dt.date.today()} — `{' '.join(['bench/watch_cost.py', *sys.argv[1:]])}`\n",
             f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, model {model.name}\n",
             "| phase | runs | agent CPU (% of a core) | CPU per run over idle (ms) | run p50 (ms) | run max (ms) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['runs']} | {r['cpu_percent']} | {r['cpu_ms_per_run']} | "
              f"{r['total_ms_p50']} | {r['total_ms_max']} |" for r in results]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        out = REPO / "bench" / "WATCH.md"
        if not out.exists():
            out.write_text("# Watch rule cost\n\nWritten by `bench/watch_cost.py`; newest last.\n")
        with out.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
