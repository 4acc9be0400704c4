#!/usr/bin/env python3
"""N requests at once over MQTT next to raw ORT GenAI running them one after the other and
batched, with the same model in one run; one request alone; the per-request fixed cost; memory.

    python bench/concurrency.py [--model smollm2|tiny|PATH] [--concurrent 8] [--tokens 128] [--json]

Raw sides run in child processes of this script (never at the same time as the agent): one
og.Generator per request in turn ("sequential"), all requests on one og.Engine ("batched"), and
all on one batched og.Generator of N rows ("generator": what the agent's groups do).
MQTT side: a private mosquitto and `edge-agent run`; the N requests are published together and
timed from the first publish to the last answer. Memory: the daemon and its inference child
after the run, against a bare process that loads the same model, builds the same batching engine
(its static KV cache is most of the memory) and answers the same requests (three batches, nine
alone): the runtime's allocator keeps what it once needed, so the work has to match.
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

from support import AgentProcess, Broker, Client, build_model, tree_pss_bytes, tree_rss_bytes  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."

RAW = r'''
import json, sys, time, secrets
import numpy as np
import onnxruntime_genai as og
folder, mode, n, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
config = og.Config(folder)
if mode in ("batched", "bare-batched"):
    config.overlay(json.dumps({"search": {"max_length": 1024}}))  # as the agent does
model = og.Model(config)
tok = og.Tokenizer(model)
ids = np.asarray(tok.encode(tok.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                                     add_generation_prompt=True)), dtype=np.int32)
def one(seed=True):
    p = og.GeneratorParams(model)
    options = {"max_length": len(ids) + tokens, "do_sample": False}
    if seed:
        options["random_seed"] = 0
    p.set_search_options(**options)
    started = time.perf_counter()
    g = og.Generator(model, p)
    created = time.perf_counter() - started
    g.append_tokens(ids)
    out, first = 0, None
    while not g.is_done():
        g.generate_next_token(); out += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return out, (out - 1) / (end - first), created
engine = og.Engine(model) if mode in ("batched", "bare-batched") else None
eos = json.load(open(folder + "/genai_config.json"))["model"]["eos_token_id"]
eos = set(eos if isinstance(eos, list) else [eos])
def generator_batch():
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=len(ids) + tokens, do_sample=False, random_seed=0, batch_size=n)
    g = og.Generator(model, p)
    g.append_tokens(np.tile(ids, (n, 1)))
    got, live = 0, [True] * n
    while not g.is_done():
        g.generate_next_token()
        for row, token in enumerate(g.get_next_tokens()):
            if live[row]:  # counted as one() counts: every step up to and with its end token
                got += 1
                live[row] = int(token) not in eos
    return got
def batched():
    buf = engine.create_event_buffer(256)
    requests = []  # held: a request the engine's caller drops is gone
    for _ in range(n):
        r = engine.create_request(); o = og.TurnOptions(r)
        o.set_max_generated_tokens(tokens); o.set_do_sample(False)
        r.begin_turn(ids, o)
        requests.append(r)
    got = 0
    while engine.has_pending_requests():
        for ev in engine.run(buf):
            if ev.flags & og.EngineEventFlags.TOKEN:
                got += 1
    for r in requests:
        r.close()
    return got
one(); one()  # warm
if mode == "sequential":
    started = time.perf_counter(); total = sum(one()[0] for _ in range(n)); seconds = time.perf_counter() - started
    single = [one()[1] for _ in range(7)]
    created_seeded = [one(True)[2] * 1000 for _ in range(5)]
    created_plain = [one(False)[2] * 1000 for _ in range(5)]
    print(json.dumps({"tokens": total, "seconds": seconds, "single_tps": sorted(single)[3],
                      "generator_ms_seeded": sorted(created_seeded)[2],
                      "generator_ms_unseeded": sorted(created_plain)[2]}))
elif mode in ("batched", "generator"):
    run = batched if mode == "batched" else generator_batch
    run()
    started = time.perf_counter(); total = run(); seconds = time.perf_counter() - started
    print(json.dumps({"tokens": total, "seconds": seconds}))
else:  # bare: load and answer what the agent answered in this bench, then report memory
    if engine is not None:  # the agent's warm-up group and two batches of n
        batched(); batched(); batched()
    for _ in range(9):  # and its lone requests
        one()
    rollup = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/smaps_rollup") if l.startswith(("Rss:", "Pss:"))}
    print(json.dumps({"rss": rollup["Rss"], "pss": rollup["Pss"]}))
'''


def raw(model: Path, mode: str, n: int, tokens: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", RAW, str(model), mode, str(n), str(tokens), PROMPT],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mqtt(model: Path, n: int, tokens: int) -> dict[str, Any]:
    broker = Broker()
    broker.start()
    client = Client(broker.port)
    workdir = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    agent = AgentProcess(workdir, broker.port, model, model__max_new_tokens=tokens,
                         limits__queue_size=max(8, n))
    try:
        agent.start(client)
        client.subscribe(agent.response_topic)

        def ask(count: int) -> tuple[float, list[dict[str, Any]]]:
            ids = [uuid.uuid4().hex for _ in range(count)]
            started = time.perf_counter()
            for rid in ids:
                client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": PROMPT, "max_tokens": tokens}))
            answers = [client.wait_for(lambda d: d.get("id") in ids, timeout=600) for _ in ids]
            return time.perf_counter() - started, answers

        ask(1)
        ask(n)  # warm both paths
        singles = [ask(1)[1][0] for _ in range(7)]
        seconds, answers = ask(n)
        assert agent.proc is not None
        rss = tree_rss_bytes(agent.proc.pid)
        pss = tree_pss_bytes(agent.proc.pid)
        daemon_rss = next(int(line.split()[1]) * 1024 for line in  # the daemon alone, not its child
                          Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
        paths = [line.get("path") for line in agent.log_lines() if line.get("event") == "request.done"][-n:]
        return {"tokens": sum(a["usage"]["completion_tokens"] for a in answers), "seconds": seconds,
                "ok": all(a["ok"] for a in answers), "batched": paths.count("batch"), "grouped": paths.count("group"),
                "single_tps": sorted(a["timings"]["tokens_per_s"] for a in singles)[3],
                "single_ttft_ms": sorted(a["timings"]["ttft_ms"] for a in singles)[3], "rss": rss,
                "daemon_rss": daemon_rss, "pss": pss}
    finally:
        if agent.proc is not None:
            agent.stop()
        client.close()
        broker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = build_model(args.model) if args.model in ("tiny", "smollm2") else Path(args.model)
    n, tokens = args.concurrent, args.tokens
    agent = mqtt(model, n, tokens)
    sequential = raw(model, "sequential", n, tokens)
    batched = raw(model, "batched", n, tokens)
    generator = raw(model, "generator", n, tokens)
    bare = raw(model, "bare", 1, tokens)
    bare_batched = raw(model, "bare-batched", n, tokens)
    rate = {name: r["tokens"] / r["seconds"] for name, r in
            (("mqtt", agent), ("sequential", sequential), ("batched", batched), ("generator", generator))}
    result = {
        "model": model.name, "concurrent": n, "tokens": tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "mqtt_over_sequential": round(rate["mqtt"] / rate["sequential"], 2),
        "batched_over_sequential": round(rate["batched"] / rate["sequential"], 2),
        "generator_over_sequential": round(rate["generator"] / rate["sequential"], 2),
        "mqtt_over_generator": round(rate["mqtt"] / rate["generator"], 3),
        "answers_ok": agent["ok"], "answers_batched": agent["batched"], "answers_grouped": agent["grouped"],
        "single_tps": {"mqtt": agent["single_tps"], "raw": round(sequential["single_tps"], 1)},
        "single_mqtt_over_raw": round(agent["single_tps"] / sequential["single_tps"], 3),
        "single_ttft_ms_mqtt": agent["single_ttft_ms"],
        "generator_ms": {"seeded": round(sequential["generator_ms_seeded"], 2),
                         "unseeded": round(sequential["generator_ms_unseeded"], 2)},
        "rss_mb": {"daemon": round(agent["daemon_rss"] / 2**20, 1),
                   "daemon_and_child": round(agent["rss"] / 2**20, 1),
                   "bare": round(bare["rss"] / 2**20, 1),
                   "bare_with_engine": round(bare_batched["rss"] / 2**20, 1),
                   "over_bare_with_engine": round((agent["rss"] - bare_batched["rss"]) / 2**20, 1)},
        "pss_mb": {"daemon_and_child": round(agent["pss"] / 2**20, 1),
                   "bare_with_engine": round(bare_batched["pss"] / 2**20, 1),
                   "over_bare_with_engine": round((agent["pss"] - bare_batched["pss"]) / 2**20, 1)},
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
