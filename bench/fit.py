#!/usr/bin/env python3
"""Does the agent fit the box as its memory plan says, and does a full queue get what the
runtime can give? (issue 18 points 5 and 6; results in bench/FIT.md)

    python bench/fit.py [--model smollm2 phi35-2l] [--concurrent 8] [--tokens 128]
                        [--throughput smollm2] [--json]

Memory, for each model, with batching on and off: a private mosquitto and `edge-agent run`;
the plan as the agent reports it (`memory` in its retained status and stats: weights_mb, the
loaded_mb its inference process measured at load, reserved_mb = the batching engine's group
cache + the requests' caches and prompt logits held now); the resident
memory (VmRSS) of the daemon and of its inference process, idle after the warm-up and at its
peak while N requests run at once (sampled every 20 ms; the plan's peak from stats every
0.2 s). The inference process's own figure is its RSS less a bare process that imports what it
imports (runtime, numpy, the child's modules) and loads nothing: the plan counts the model,
the box's reserve counts the rest. phi35-2l (scripts/build_test_models.py phi35-2l, ≈40 s
once) is Phi-3.5-mini's shape with 2 of its 32 layers: its cache figures scale with the layers.

Throughput (`--throughput` model): N requests at once through the agent against raw ORT GenAI
in the same run, one batched og.Generator of N (bench/concurrency.py's "generator"), og.Engine
and one generator after the other. The lone request's fixed cost is bench/roundtrip.py's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from concurrency import PROMPT, raw  # noqa: E402
from support import AgentProcess, Broker, Client, build_model, retained_status  # noqa: E402

SAMPLE_S = 0.02
BARE = r'''
import edge_agent.inference.child.worker, edge_agent.inference.child.engine, numpy  # what the child imports
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:")))
'''


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one inference process under {pid}, found {children}")
    return int(children[0])


def bare_rss() -> int:
    out = subprocess.run([sys.executable, "-c", BARE], check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout
    return int(out.strip().splitlines()[-1])


def run_agent(model: Path, batching: bool, n: int, tokens: int) -> dict[str, Any]:
    """Idle and busy figures of one agent: the plan it reports, the RSS it holds, and its
    throughput for N at once."""
    broker = Broker()
    broker.start()
    client, stats = Client(broker.port), Client(broker.port)
    agent = AgentProcess(Path(tempfile.mkdtemp(prefix="bench-fit-")), broker.port, model,
                         model__max_new_tokens=tokens, limits__queue_size=max(8, n),
                         inference__batching=batching, stats_interval_s=0.2)
    try:
        agent.start(client)
        assert agent.proc is not None
        client.subscribe(agent.response_topic)
        stats.subscribe(f"{agent.prefix}/{agent.device_id}/stats")
        plan = retained_status(broker.port, agent)["memory"]
        daemon, child = agent.proc.pid, child_of(agent.proc.pid)
        time.sleep(1.0)
        idle = {"daemon": rss(daemon), "child": rss(child)}
        ask_all(client, agent, n, tokens, [])  # a first burst: the allocator's pools grow once
        stats.drain()
        peaks: list[int] = []
        seconds, answers = ask_all(client, agent, n, tokens, peaks, child)
        time.sleep(0.5)  # the stats after the last answer
        reserved = [doc["memory"]["reserved_mb"] for doc in stats.drain() if "memory" in doc]
        paths = [line.get("path") for line in agent.log_lines() if line.get("event") == "request.done"][-n:]
        return {"plan": plan, "idle": idle, "busy_child": max(peaks), "busy_daemon": rss(daemon),
                "plan_busy_reserved_mb": max(reserved, default=plan["reserved_mb"]),
                "tokens": sum(a["usage"]["completion_tokens"] for a in answers), "seconds": seconds,
                "prompt_tokens": max(a["usage"]["prompt_tokens"] for a in answers),
                "ok": all(a["ok"] for a in answers), "paths": {p: paths.count(p) for p in set(paths)}}
    finally:
        if agent.proc is not None:
            agent.stop()
        client.close()
        stats.close()
        broker.close()


def ask_all(client: Client, agent: AgentProcess, n: int, tokens: int, peaks: list[int],
            child: int | None = None) -> tuple[float, list[dict[str, Any]]]:
    """N requests published together; the child's RSS sampled until the last answer."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    started = time.perf_counter()
    for rid in ids:
        client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": PROMPT, "max_tokens": tokens}))
    answers: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 600
    while len(answers) < n and time.monotonic() < deadline:
        if child is not None:
            peaks.append(rss(child))
        try:
            _, doc, _ = client.next(SAMPLE_S)
        except Exception:  # noqa: BLE001 - queue.Empty: nothing yet, sample again
            continue
        if doc.get("id") in ids:
            answers[doc["id"]] = doc
    if len(answers) < n:
        raise TimeoutError(f"{n - len(answers)} of {n} answers missing")
    return time.perf_counter() - started, list(answers.values())


def memory_rows(model: Path, n: int, tokens: int, bare: int) -> list[dict[str, Any]]:
    rows = []
    for batching in (True, False):
        got = run_agent(model, batching, n, tokens)
        plan = got["plan"]
        # The load as planned (file size + the batching engine's group cache) or as the child
        # measured it, whichever is more (what admission takes off the budget); then the
        # requests' caches and prompt logits the child reported held at the peak.
        file_plan = plan["weights_mb"] + plan["reserved_mb"]
        planned_idle = max(file_plan, plan["loaded_mb"])
        # What the child reserves for the N at once, by its own formula (caches, and the
        # prompts' logits: all N read their prompts in the same turn, single or grouped);
        # stats every 0.2 s see it only by chance, the logits last one prefill.
        prompt = got["prompt_tokens"]
        requests = n * ((prompt + tokens) * plan["kv_bytes_per_token"] + prompt * plan["logits_bytes_per_token"])
        planned_busy = planned_idle + requests / 2**20
        child_idle = (got["idle"]["child"] - bare) / 2**20
        child_busy = (got["busy_child"] - bare) / 2**20
        rows.append({"model": model.name, "batching": batching, "weights_mb": plan["weights_mb"],
                     "loaded_mb": plan["loaded_mb"], "file_plan_mb": round(file_plan, 1),
                     "measured_idle_over_file_plan": round(child_idle / file_plan, 3),
                     "measured_idle_over_loaded": round(child_idle / plan["loaded_mb"], 3),
                     "stats_peak_reserved_mb": got["plan_busy_reserved_mb"], "prompt_tokens": prompt,
                     "kv_bytes_per_token": plan["kv_bytes_per_token"],
                     "idle": {"planned_mb": round(planned_idle, 1), "measured_mb": round(child_idle, 1),
                              "measured_over_planned": round(child_idle / planned_idle, 3)},
                     "busy": {"planned_mb": round(planned_busy, 1), "measured_mb": round(child_busy, 1),
                              "measured_over_planned": round(child_busy / planned_busy, 3)},
                     "rss_mb": {"daemon_idle": round(got["idle"]["daemon"] / 2**20, 1),
                                "daemon_busy": round(got["busy_daemon"] / 2**20, 1),
                                "child_idle": round(got["idle"]["child"] / 2**20, 1),
                                "child_busy_peak": round(got["busy_child"] / 2**20, 1),
                                "bare_child": round(bare / 2**20, 1)},
                     "tokens_per_s": round(got["tokens"] / got["seconds"], 1), "answers_ok": got["ok"],
                     "paths": got["paths"]})
    return rows


def throughput(model: Path, n: int, tokens: int, agent_rate: float) -> dict[str, Any]:
    rates = {mode: r["tokens"] / r["seconds"] for mode, r in
             ((mode, raw(model, mode, n, tokens)) for mode in ("generator", "batched", "sequential"))}
    return {"model": model.name, "concurrent": n, "tokens": tokens,
            "tokens_per_s": {"agent": round(agent_rate, 1), **{k: round(v, 1) for k, v in rates.items()}},
            "agent_over_generator": round(agent_rate / rates["generator"], 3),
            "agent_over_sequential": round(agent_rate / rates["sequential"], 2),
            "generator_over_sequential": round(rates["generator"] / rates["sequential"], 2),
            "engine_over_sequential": round(rates["batched"] / rates["sequential"], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["smollm2", "phi35-2l"])
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--throughput", default="smollm2", help="the model for the throughput figures ('' none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bare = bare_rss()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": open("/proc/loadavg").read().split()[:3],
                              "memory": [], "throughput": None}
    for name in args.model:
        model = build_model(name) if name in ("tiny", "smollm2", "phi35-2l") else Path(name)
        rows = memory_rows(model, args.concurrent, args.tokens, bare)
        result["memory"].extend(rows)
        if name == args.throughput:
            result["throughput"] = throughput(model, args.concurrent, args.tokens, rows[0]["tokens_per_s"])
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
