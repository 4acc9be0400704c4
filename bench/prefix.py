#!/usr/bin/env python3
"""Prompt-prefix reuse (issue 18 point 3): time to first token of requests that share a long
system prompt, with and without reuse, through the daemon over MQTT and on the raw runtime.

    PYTHONPATH=$PWD python bench/prefix.py [--model smollm2|tiny|PATH] [--runs 6] [--tokens 16]
                                           [--prefix-tokens 1000] [--burst] [--json]

MQTT side: a private mosquitto and `edge-agent run` as a subprocess, twice: with
`inference.prefix_cache = true` (the first request computes the whole system prompt, the next
ones, each a different short question, continue from its cache) and with it false (every
request computes it all). Each side times ttft_ms as the agent reports it (from the start of
generation: template, tokenize, prompt, first token) and checks that the answers are the same.
Raw side: in this process, after the agents have stopped, og.Generator from scratch against
`rewind_to(common)` + `append_tokens(rest)` on the previous request's generator.
--burst: in this process through the child's scheduler with batching on, four requests at once
after one that left its cache, the one that can continue it on its own generator
(core.PREFIX_OVER_BATCH) or all four in the batching engine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reuse the tests' broker, agent process and client
sys.path.insert(0, str(REPO / "bench"))

from roundtrip import resolve_model  # noqa: E402
from support import Broker, answers_client, ask, running_agent  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three flowers.", "Why is the sky blue?",
             "What do bees do?", "Where does rain come from?", "How tall is a sunflower?",
             "Is it cold in winter?", "What grows in spring?"]
RULES = ["Answer in one short sentence.", "Never invent facts you are not sure of.",
         "Prefer plain words over jargon.", "If a question is about the garden, mention the season.",
         "Be polite to every visitor at the door.", "Say when a camera image is too dark to tell.",
         "Name the room when you speak about a device.", "Keep numbers in metric units."]


def system_prompt(tokens: int) -> str:
    """About `tokens` tokens of house rules (≈ 14 tokens a rule for SmolLM2's tokenizer)."""
    lines = [f"Rule {n + 1}: {RULES[n % len(RULES)]}" for n in range(max(1, tokens // 14))]
    return "You are the assistant of a house. " + " ".join(lines)


def mqtt_side(model: Path, system: str, tokens: int, runs: int, reuse: bool) -> list[dict[str, Any]]:
    with ExitStack() as stack:  # closed in reverse: client, agent, work folder, broker
        broker = Broker()
        broker.start()
        stack.callback(broker.close)
        workdir = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
        stack.callback(shutil.rmtree, workdir, True)
        agent = stack.enter_context(contextmanager(running_agent)(
            workdir, broker.port, model, inference__prefix_cache=reuse, model__max_new_tokens=max(tokens, 64)))
        client = stack.enter_context(contextmanager(answers_client)(broker.port, agent))
        results = []
        for n in range(runs + 1):
            answer = ask(client, agent, {"id": uuid.uuid4().hex, "system": system,
                                         "prompt": QUESTIONS[n % len(QUESTIONS)], "max_tokens": tokens}, 300)
            if not answer.get("ok"):
                raise RuntimeError(f"agent answered an error: {answer.get('error')}")
            results.append({"ttft_ms": answer["timings"]["ttft_ms"], "total_ms": answer["timings"]["total_ms"],
                            **answer["usage"], "text": answer["text"]})
        return results


def raw_side(model: Path, system: str, runs: int) -> list[dict[str, Any]]:
    """Per question: ms to the first token from scratch, and continued from the previous one's
    generator (which is sized to hold either), and whether the first tokens are the same."""
    import numpy as np
    import onnxruntime_genai as og
    og_model = og.Model(str(model))
    tokenizer = og.Tokenizer(og_model)

    def ids(question: str) -> Any:
        messages = json.dumps([{"role": "system", "content": system}, {"role": "user", "content": question}])
        return np.asarray(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)),
                          dtype=np.int32)

    def first_token(generator: Any, tokens: Any) -> tuple[int, float]:
        started = time.perf_counter()
        generator.append_tokens(tokens)
        generator.generate_next_token()
        return int(generator.get_next_tokens()[0]), (time.perf_counter() - started) * 1000

    def fresh(tokens: Any) -> Any:
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=len(tokens) + 64, do_sample=False)
        return og.Generator(og_model, params)

    previous = ids(QUESTIONS[-1])
    kept = fresh(previous)
    first_token(kept, previous)
    results = []
    for n in range(runs):
        tokens = ids(QUESTIONS[n % len(QUESTIONS)])
        scratch_token, scratch_ms = first_token(fresh(tokens), tokens)
        common = next((i for i, (a, b) in enumerate(zip(previous, tokens)) if a != b), len(tokens)) - 2
        started = time.perf_counter()
        kept.rewind_to(common)
        token, ms = first_token(kept, tokens[common:])
        results.append({"prompt_tokens": len(tokens), "common": common, "scratch_ms": scratch_ms,
                        "reuse_ms": (time.perf_counter() - started) * 1000, "same_token": token == scratch_token})
        previous = tokens  # the next question continues from this one's cache
    return results


def burst_side(model: Path, system: str, tokens: int) -> dict[str, dict[str, float]]:
    """Four requests at once, after one that left its cache: with batching (CPU: static groups
    of 4), does the one that can continue the kept cache do better on its own generator
    (core.PREFIX_OVER_BATCH) than in the batch with the others? In process, through the Core."""
    from edge_agent.inference.child import core as core_module
    from edge_agent.inference.child.engine import OrtGenaiEngine
    from edge_agent.inference.types import GenerationParams, Work
    from edge_agent.log import configure

    configure("warning", "auto")  # not the scheduler's debug lines
    engine = OrtGenaiEngine(model, "cpu", batching=True)
    engine.load()

    def work(question: str) -> Work:
        return Work(({"role": "system", "content": system}, {"role": "user", "content": question}),
                    GenerationParams(tokens))

    results = {}
    for label, threshold in (("hit on its own generator", core_module.PREFIX_OVER_BATCH),
                             ("all four in the batch", 10**9)):
        core_module.PREFIX_OVER_BATCH = threshold
        core = core_module.Core(engine, prefix_cache=True, kv_bytes_per_token=1)
        core.run_one(work(QUESTIONS[-1]))  # leaves its cache
        started, done = time.monotonic(), {}
        events = [e for rid in range(4) for e in core.submit(rid, work(QUESTIONS[rid]))]
        while len(done) < 4:
            done.update({rid: (value, time.monotonic()) for kind, rid, value in events if kind == "done"})
            events = core.step() if len(done) < 4 else []
        ttfts = sorted(value.ttft_ms for value, _ in done.values())
        results[label] = {"paths": ",".join(value.path for value, _ in done.values()),
                          "ttft_min_ms": ttfts[0], "ttft_max_ms": ttfts[-1],
                          "all_done_ms": (max(at for _, at in done.values()) - started) * 1000}
    return results


def p50(values: list[float]) -> float:
    return statistics.median(values)


def report(model: Path, on: list[dict[str, Any]], off: list[dict[str, Any]], raw: list[dict[str, Any]]) -> str:
    second = [r["ttft_ms"] for r in on[1:]]
    without = [r["ttft_ms"] for r in off[1:]]
    lines = [f"model {model.name}, prompt {on[0]['prompt_tokens']} tokens, {len(second)} timed requests a side",
             "| measure | p50 ms | min | max |", "|---|---:|---:|---:|",
             f"| MQTT, first request (nothing kept), ttft_ms | {on[0]['ttft_ms']:.0f} | | |"]
    for name, values in (("MQTT, later requests with reuse, ttft_ms", second),
                         ("MQTT, the same requests without reuse, ttft_ms", without),
                         ("raw, first token from scratch", [r["scratch_ms"] for r in raw]),
                         ("raw, first token after rewind_to + append", [r["reuse_ms"] for r in raw])):
        lines.append(f"| {name} | {p50(values):.0f} | {min(values):.0f} | {max(values):.0f} |")
    same = all(a["text"] == b["text"] for a, b in zip(on, off))
    lines += ["", f"cached_tokens with reuse: {[r['cached_tokens'] for r in on]}",
              f"answers the same with and without reuse: {same}; raw first tokens the same: "
              f"{all(r['same_token'] for r in raw)}",
              f"second / first (MQTT p50 with reuse / p50 without): {p50(second) / p50(without):.1%}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model folder")
    parser.add_argument("--runs", type=int, default=6, help="timed requests a side after the first (default 6)")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each answer (default 16)")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="system prompt size (default ~1000)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON too")
    parser.add_argument("--burst", action="store_true",
                        help="also: 4 requests at once with batching, the prefix hit alone or in the batch")
    args = parser.parse_args()
    model = resolve_model(args.model)
    if model is None or args.runs < 1:
        parser.error("--model: smollm2, tiny or a folder with genai_config.json; --runs at least 1")
    system = system_prompt(args.prefix_tokens)
    on = mqtt_side(model, system, args.tokens, args.runs, reuse=True)
    off = mqtt_side(model, system, args.tokens, args.runs, reuse=False)
    raw = raw_side(model, system, args.runs)
    print(report(model, on, off, raw))
    if args.burst:
        print("\n| burst of 4, batching on | paths | first token, min ms | max ms | all done ms |\n|---|---|---:|---:|---:|")
        for label, row in burst_side(model, system, args.tokens).items():
            print(f"| {label} | {row['paths']} | {row['ttft_min_ms']:.0f} | {row['ttft_max_ms']:.0f} "
                  f"| {row['all_done_ms']:.0f} |")
    if args.json:
        print(json.dumps({"on": on, "off": off, "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
