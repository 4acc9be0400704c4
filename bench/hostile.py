#!/usr/bin/env python3
"""Time each hostile input's error answer: publish -> error received, per kind.

    python bench/hostile.py [--runs 5] [--json]

A private mosquitto and `edge-agent run` on the tiny vision model, set up as tests/test_hostile.py
sets it up (tests/hostile.py has the cases and the settings). Each case is sent `--runs` times,
each time followed by a good request that must be answered. Prints, per kind, the number of cases,
the median and the largest time to the error, then the agent's RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reuse the tests' broker, agent process, client and cases

from hostile import AGENT_SETTINGS, CAMERA, good_request, hostile_inputs  # noqa: E402
from support import AgentProcess, Broker, Client, build_model, tree_rss_bytes  # noqa: E402
from video import make_clip  # noqa: E402

ANSWER_TIMEOUT_S = 60.0


def exchange(client: Client, agent: AgentProcess, payload: bytes, response_topic: str | None) -> tuple[dict[str, Any], float]:
    correlation = uuid.uuid4().bytes
    started = time.perf_counter()
    client.publish(agent.request_topic, payload, response_topic=response_topic, correlation=correlation)
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        _, doc, props = client.next(max(deadline - time.monotonic(), 0.001))
        if getattr(props, "CorrelationData", None) == correlation:
            return doc, (time.perf_counter() - started) * 1000


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """The daemon and its inference process together."""
    return tree_rss_bytes(pid, key) / 2**20


def run(runs: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    broker, client, agent = Broker(), None, None
    try:
        broker.start()
        client = Client(broker.port)
        # Without it Nagle holds each request behind the PUBACK sent just before (+40 ms).
        client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clip = make_clip(workdir / "clip.mp4")
        agent = AgentProcess(workdir, broker.port, build_model("tiny-vision"),
                             cameras={CAMERA: {"source": str(clip), "mode": "on_demand"}}, **AGENT_SETTINGS)
        agent.start(client)
        client.subscribe(agent.response_topic)
        assert agent.proc is not None
        exchange(client, agent, good_request(uuid.uuid4().hex), None)
        rss_before = rss_mib(agent.proc.pid)
        per_kind: dict[str, list[float]] = defaultdict(list)
        per_case: dict[str, list[float]] = defaultdict(list)
        wrong: list[str] = []
        count = 0
        for index in range(runs):
            for case in hostile_inputs(f"-r{index}"):
                doc, ms = exchange(client, agent, case.payload, case.response_topic)
                count += 1
                if doc.get("ok") or doc["error"]["code"] != case.code:
                    wrong.append(f"{case.name}: {doc}")
                per_kind[case.kind].append(ms)
                per_case[case.name].append(ms)
                good, _ = exchange(client, agent, good_request(uuid.uuid4().hex), None)
                if not good.get("ok"):
                    wrong.append(f"good request after {case.name}: {good}")
        slowest = sorted(per_case.items(), key=lambda item: -max(item[1]))[:5]
        return {
            "runs": runs, "sent": count, "wrong": wrong,
            "kinds": {kind: {"cases": len(ms) // runs, "p50_ms": statistics.median(ms), "max_ms": max(ms)}
                      for kind, ms in sorted(per_kind.items())},
            "slowest_cases": {name: max(ms) for name, ms in slowest},
            "max_ms": max(max(ms) for ms in per_kind.values()),
            "rss_before_mib": rss_before, "rss_after_mib": rss_mib(agent.proc.pid),
            "rss_peak_mib": rss_mib(agent.proc.pid, "VmHWM"),
        }
    finally:
        if agent is not None and agent.proc is not None:
            agent.stop()
        if client is not None:
            client.close()
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="times each case is sent")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if result["wrong"] else 0
    print(f"{result['sent']} hostile requests ({len(result['kinds'])} kinds, {args.runs} runs), "
          f"{len(result['wrong'])} wrong answers")
    print("| kind | cases | p50 ms | max ms |\n|---|---:|---:|---:|")
    for kind, row in result["kinds"].items():
        print(f"| {kind} | {row['cases']} | {row['p50_ms']:.1f} | {row['max_ms']:.1f} |")
    print(f"\nmax {result['max_ms']:.1f} ms; slowest cases: "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in result["slowest_cases"].items()))
    print(f"agent RSS: {result['rss_before_mib']:.1f} MiB before, {result['rss_after_mib']:.1f} MiB after, "
          f"peak (VmHWM, start-up included) {result['rss_peak_mib']:.1f} MiB")
    for line in result["wrong"]:
        print("WRONG:", line)
    return 1 if result["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
