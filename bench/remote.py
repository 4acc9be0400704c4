#!/usr/bin/env python3
"""What the agent adds in front of an OpenAI-compatible server: the MQTT round trip through the
`openai` backend against a direct call to the same server.

    .venv/bin/python bench/remote.py [--runs 50] [--tokens 1] [--json] [--no-append]

A real llama.cpp server (llama-cpp-python, SmolLM2; tests/llama_server.py builds it once), a
private mosquitto (Nagle off, as the tests' broker) and the agent as a process with
`model.backend = "openai"`. Alternating, `--runs` times each:

- direct: one keep-alive httpx client posts the body the agent would send (the same messages,
  max_tokens, stream with usage, greedy) and reads the stream to its end;
- mqtt: a pipeline (TCP_NODELAY on its socket) publishes the request and waits for the answer.

The overhead is the difference of the medians. Results are printed and appended to
bench/REMOTE.md unless --no-append.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from edge_agent.inference.types import GenerationParams, Work  # noqa: E402
from edge_agent.inference.openai_client import request_body  # noqa: E402
from llama_server import LlamaServer  # noqa: E402
from support import AgentProcess, Broker, Client, build_model  # noqa: E402

PROMPT = "Say hello."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    direct_ms: list[float] = []
    mqtt_ms: list[float] = []
    with LlamaServer() as server:
        broker = Broker()
        broker.start()
        client = Client(broker.port)
        client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        agent = AgentProcess(work, broker.port, build_model("tiny"), model__backend="openai",
                             openai={"base_url": server.url, "model": server.model_id})
        try:
            agent.start(client)
            client.subscribe(agent.response_topic)
            body = request_body(server.model_id, Work(({"role": "user", "content": PROMPT},),
                                                      GenerationParams(max_new_tokens=args.tokens)))
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for run in range(args.runs + 2):  # two warm-up rounds, not counted
                    started = time.perf_counter()
                    with http.stream("POST", "/chat/completions", json=body) as response:
                        for _ in response.iter_lines():
                            pass
                    direct = (time.perf_counter() - started) * 1000
                    rid = uuid.uuid4().hex
                    started = time.perf_counter()
                    client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": PROMPT,
                                                                    "max_tokens": args.tokens}))
                    answer = client.wait_for(lambda d: d.get("id") == rid, 60)
                    via_mqtt = (time.perf_counter() - started) * 1000
                    assert answer["ok"], answer
                    if run >= 2:
                        direct_ms.append(direct)
                        mqtt_ms.append(via_mqtt)
        finally:
            agent.stop()
            client.close()
            broker.close()
    report(direct_ms, mqtt_ms, args)
    return 0


def report(direct_ms: list[float], mqtt_ms: list[float], args: argparse.Namespace) -> None:
    def p(values: list[float], q: int) -> float:
        return round(statistics.quantiles(values, n=100)[q - 1], 2)

    result = {"runs": len(direct_ms), "tokens": args.tokens,
              "direct_p50_ms": round(statistics.median(direct_ms), 2), "direct_p95_ms": p(direct_ms, 95),
              "mqtt_p50_ms": round(statistics.median(mqtt_ms), 2), "mqtt_p95_ms": p(mqtt_ms, 95)}
    result["overhead_p50_ms"] = round(result["mqtt_p50_ms"] - result["direct_p50_ms"], 2)
    if args.json:
        print(json.dumps(result, indent=2))
    text = (f"\n## {dt.date.today()} — `{' '.join(['bench/remote.py', *sys.argv[1:]])}`\n\n"
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"llama-cpp-python server with SmolLM2 Q4_1, {result['runs']} runs of {args.tokens} token(s)\n\n"
            "| path | p50 (ms) | p95 (ms) |\n|---|---|---|\n"
            f"| direct httpx call, streamed | {result['direct_p50_ms']} | {result['direct_p95_ms']} |\n"
            f"| MQTT -> edge-agent -> server -> MQTT | {result['mqtt_p50_ms']} | {result['mqtt_p95_ms']} |\n\n"
            f"Overhead (p50): **{result['overhead_p50_ms']} ms** (target: at most 5 ms).\n")
    print(text)
    if not args.no_append:
        out = REPO / "bench" / "REMOTE.md"
        if not out.exists():
            out.write_text("# The agent in front of an OpenAI-compatible server\n\n"
                           "Written by `bench/remote.py`; newest last.\n")
        with out.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    sys.exit(main())
