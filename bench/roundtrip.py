#!/usr/bin/env python3
"""Round trip of one answer over MQTT next to raw ORT GenAI generation of the same prompt.

    python bench/roundtrip.py [--model tiny|smollm2|PATH] [--runs 20] [--tokens 32]
                              [--prompt TEXT] [--tcp-nodelay] [--json]

MQTT side: a private mosquitto and `edge-agent run` as a subprocess; each run publishes one MQTT 5
request (response topic + correlation data) and times publish -> answer received. Raw side: in
this process, what the engine does per request without the daemon (chat template, tokenize, greedy
loop, detokenize), after the agent has stopped so the two never share the CPU. Both sides do
2 untimed warm-up runs (WARMUP_RUNS) first.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reuse the tests' broker, agent process and client

from support import AgentProcess, Broker, Client, build_model  # noqa: E402

WARMUP_RUNS = 2
ANSWER_TIMEOUT_S = 120.0
# A prompt that asks for a long answer, so a real model does not stop before --tokens.
DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."


def _await_answer(client: Client, topic: str, correlation: bytes) -> dict[str, Any]:
    """The answer to this request; skips anything else the client is subscribed to."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        got_topic, doc, props = client.next(max(deadline - time.monotonic(), 0.001))
        if got_topic == topic and getattr(props, "CorrelationData", None) == correlation:
            return doc


def mqtt_runs(model: Path, prompt: str, tokens: int, runs: int, nodelay: bool) -> list[dict[str, Any]]:
    """One dict per timed run: round trip (ms) and the agent's own timings and usage."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    broker, client, agent = Broker(), None, None
    try:
        if not nodelay:  # the test broker turns Nagle off; mosquitto's own default leaves it on
            conf = broker.dir / "mosquitto.conf"
            conf.write_text(conf.read_text().replace("set_tcp_nodelay true", "set_tcp_nodelay false"))
        broker.start()
        client = Client(broker.port)
        if nodelay:
            client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # model.max_new_tokens caps a request's max_tokens: keep it above --tokens.
        agent = AgentProcess(workdir, broker.port, model, model__max_new_tokens=max(tokens, 64))
        agent.start(client)
        reply = f"bench/{uuid.uuid4().hex[:8]}/answer"
        client.subscribe(reply)
        request = json.dumps({"prompt": prompt, "max_tokens": tokens})
        results = []
        for _ in range(WARMUP_RUNS + runs):
            correlation = uuid.uuid4().bytes
            started = time.perf_counter()
            client.publish(agent.request_topic, request, response_topic=reply, correlation=correlation)
            answer = _await_answer(client, reply, correlation)
            round_trip_ms = (time.perf_counter() - started) * 1000
            if not answer.get("ok"):
                raise RuntimeError(f"agent answered an error: {answer.get('error')}")
            results.append({"round_trip_ms": round_trip_ms, **answer["timings"],
                            "completion_tokens": answer["usage"]["completion_tokens"]})
        return results[WARMUP_RUNS:]
    except Exception:
        if agent is not None and agent.log_path.exists():  # the log is deleted below
            sys.stderr.write(agent.log_path.read_text()[-4000:])
        raise
    finally:
        if agent is not None and agent.proc is not None:
            agent.stop()  # SIGTERM, then wait for the exit
        if client is not None:
            client.close()
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def raw_runs(model: Path, prompt: str, tokens: int, runs: int) -> list[dict[str, Any]]:
    """One dict per timed run: generation time (ms) and tokens produced, as the engine does it."""
    import onnxruntime_genai as og  # only the raw side needs it in this process
    eos = json.loads((model / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    og_model = og.Model(str(model))
    tokenizer = og.Tokenizer(og_model)
    messages = json.dumps([{"role": "user", "content": prompt}])
    results = []
    for _ in range(WARMUP_RUNS + runs):
        started = time.perf_counter()
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
        generator = og.Generator(og_model, params)
        generator.append_tokens(ids)
        stream, produced = tokenizer.create_stream(), 0
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos_ids:  # the engine stops here too and does not count it
                break
            stream.decode(token)
            produced += 1
        del generator  # frees the KV cache before the next run, as the engine does
        results.append({"generate_ms": (time.perf_counter() - started) * 1000,
                        "completion_tokens": produced})
    return results[WARMUP_RUNS:]


def summarize(values: list[float]) -> dict[str, float]:
    p95 = statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]
    return {"p50": statistics.median(values), "p95": p95, "mean": statistics.fmean(values)}


def summary(mqtt: list[dict[str, Any]], raw: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    rows = {
        "MQTT round trip ms": [r["round_trip_ms"] for r in mqtt],
        "agent total_ms": [r["total_ms"] for r in mqtt],
        "agent queue_ms": [r["queue_ms"] for r in mqtt],
        "agent ttft_ms": [r["ttft_ms"] for r in mqtt if r["ttft_ms"] is not None],
        "raw ORT GenAI generation ms": [r["generate_ms"] for r in raw],
        # Paired per run: MQTT, broker and JSON work outside the agent's own clock.
        "round trip − agent total_ms": [r["round_trip_ms"] - r["total_ms"] for r in mqtt],
    }
    table = {name: summarize(values) for name, values in rows.items() if values}
    # The two sides run at different times, so the overhead compares statistics, not pairs.
    rt, gen = table["MQTT round trip ms"], table["raw ORT GenAI generation ms"]
    table["overhead: round trip − raw, ms"] = {k: rt[k] - gen[k] for k in rt}
    table["agent tokens/s"] = summarize([r["tokens_per_s"] for r in mqtt])
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    lines = ["| measure | p50 | p95 | mean |", "|---|---:|---:|---:|"]
    for name, s in table.items():
        lines.append(f"| {name} | {s['p50']:.1f} | {s['p95']:.1f} | {s['mean']:.1f} |")
    return "\n".join(lines)


def token_note(label: str, results: list[dict[str, Any]], tokens: int) -> str:
    counts = [r["completion_tokens"] for r in results]
    short = sum(c < tokens for c in counts)  # a model's end token came first: fewer tokens timed
    note = f"{label} completion tokens: min {min(counts)}, max {max(counts)}"
    return note + (f" ({short} of {len(counts)} runs stopped before {tokens})" if short else "")


def resolve_model(arg: str) -> Path | None:
    """A model folder: a test model name (built once, then cached) or a path."""
    if arg in ("tiny", "smollm2"):
        return build_model(arg)
    path = Path(arg).expanduser().resolve()
    return path if (path / "genai_config.json").is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per side (default 20)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each answer (default 32)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="user prompt")
    parser.add_argument("--tcp-nodelay", action="store_true",
                        help="Nagle off on the broker and on this client (the agent keeps its default)")
    parser.add_argument("--json", action="store_true", help="print every run and the summary as JSON")
    args = parser.parse_args()
    if args.runs < 1 or args.tokens < 1:
        parser.error("--runs and --tokens must be at least 1")
    model = resolve_model(args.model)
    if model is None:
        parser.error(f"--model {args.model}: not tiny, smollm2 or a folder with genai_config.json")
    mqtt = mqtt_runs(model, args.prompt, args.tokens, args.runs, args.tcp_nodelay)
    raw = raw_runs(model, args.prompt, args.tokens, args.runs)
    table = summary(mqtt, raw)
    if args.json:
        print(json.dumps({"model": str(model), "prompt": args.prompt, "runs": args.runs,
                          "tokens": args.tokens, "tcp_nodelay": args.tcp_nodelay,
                          "summary": table, "mqtt": mqtt, "raw": raw}, indent=2))
        return 0
    print(f"model {model}, {args.runs} runs after {WARMUP_RUNS} warm-up, max_tokens {args.tokens}, "
          f"tcp_nodelay {args.tcp_nodelay}")
    print(f"prompt: {args.prompt!r}")
    print(token_note("agent", mqtt, args.tokens) + "; " + token_note("raw", raw, args.tokens) + "\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
