#!/usr/bin/env python3
"""What Prometheus scraping costs the request path: batches of concurrent requests with and
without something GETting /metrics every 100 ms, and what one scrape costs.

    .venv/bin/python bench/metrics_scrape.py [--model smollm2|tiny|PATH] [--rounds 3] [--batches 5]
        [--concurrent 8] [--tokens 32] [--interval-ms 100] [--json] [--no-append]

A private mosquitto (Nagle off, as the tests' broker) and ONE agent as a process
(`edge-agent run`) with `[metrics] listen` on a free loopback port and `inference.max_batch` =
`--concurrent`; the real SmolLM2-135M (int4, built once by scripts/build_test_models.py) unless
`--model` says otherwise. After a warm-up batch (and a warm-up scrape), `--rounds` rounds of two
phases, "off" (no scraping) and "on" (a thread of this script GETs /metrics every
`--interval-ms`, a new connection each time, as the listener speaks HTTP/1.0); the order inside
a round alternates (off/on, on/off, ...) so that a drift of the machine does not read as a cost.
A phase is `--batches` batches; a batch publishes `--concurrent` requests at once (distinct ids,
one fixed prompt, greedy, `max_tokens` = `--tokens`) and waits for all of their answers.

Per phase: generated tokens per second of wall time (the sum of usage.completion_tokens over
the phase's wall time) and request latency (publish to answer, per request). Per "on" phase:
each scrape's time (ms, from the request to the last byte, seen from the scraper) and size.
Printed: per phase kind the mean tokens/s and its spread across rounds (min..max, stdev), p50
latency; scrape ms p50/p95/max; the difference on vs off in % next to the paired per-round
differences and the spread of the "off" phases, so a reader sees whether it is within noise.
Appended to bench/METRICS.md (date, machine, model, command) unless --no-append.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import AgentProcess, Broker, Client, build_model, free_port  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper and a storm."


class Scraper(threading.Thread):
    """GETs /metrics every `interval_s` (measured start to start) until stopped; records each
    scrape's time in ms and its size in bytes. A failed scrape is recorded as an error."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.stop_event = threading.Event()
        self.ms: list[float] = []
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self.cpu_ms = 0.0  # this thread's own CPU time while it scraped (it shares the machine)

    def run(self) -> None:
        def thread_cpu_ms() -> float:
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            return (usage.ru_utime + usage.ru_stime) * 1000

        cpu_start = thread_cpu_ms()
        next_at = time.perf_counter()
        while not self.stop_event.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    body = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                self.ms.append((time.perf_counter() - started) * 1000)
                self.sizes.append(len(body))
            except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal here
                self.errors.append(repr(exc))
            next_at += self.interval_s
            self.stop_event.wait(max(0.0, next_at - time.perf_counter()))
        self.cpu_ms = thread_cpu_ms() - cpu_start

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) the process has used so far, in ms; the daemon alone, not its
    inference child: the daemon is where /metrics is served."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def scrape_once(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, response.status
        return response.read()


def batch(client: Client, agent: AgentProcess, n: int, tokens: int) -> tuple[int, list[float]]:
    """Publish n requests at once, wait for every answer: (completion tokens, latencies in ms)."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    sent: dict[str, float] = {}
    for rid in ids:
        sent[rid] = time.perf_counter()
        client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": PROMPT, "max_tokens": tokens,
                                                        "temperature": 0}))
    waiting, generated, latencies = set(ids), 0, []
    while waiting:
        answer = client.wait_for(lambda d: d.get("id") in waiting, timeout=600)
        latencies.append((time.perf_counter() - sent[answer["id"]]) * 1000)
        waiting.discard(answer["id"])
        if not answer.get("ok"):
            raise RuntimeError(f"request failed: {answer}")
        generated += answer["usage"]["completion_tokens"]
    return generated, latencies


def phase(client: Client, agent: AgentProcess, args: argparse.Namespace, url: str, scraping: bool) -> dict[str, Any]:
    scraper = Scraper(url, args.interval_ms / 1000) if scraping else None
    if scraper is not None:
        scraper.start()
    generated, latencies = 0, []
    assert agent.proc is not None
    cpu_before = cpu_ms(agent.proc.pid)
    started = time.perf_counter()
    for _ in range(args.batches):
        got, lat = batch(client, agent, args.concurrent, args.tokens)
        generated += got
        latencies += lat
    seconds = time.perf_counter() - started
    if scraper is not None:
        scraper.stop()
    daemon_cpu = cpu_ms(agent.proc.pid) - cpu_before
    return {"scraping": scraping, "tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds,
            "daemon_cpu_ms": daemon_cpu,
            "latencies_ms": latencies, "scrape_ms": scraper.ms if scraper else [],
            "scrape_bytes": scraper.sizes if scraper else [], "scraper_cpu_ms": scraper.cpu_ms if scraper else 0.0, "scrape_errors": scraper.errors if scraper else []}


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return round(values[0], 2) if values else float("nan")
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}


def ci95(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student's t); nan for one value."""
    if len(values) < 2:
        return float("nan")
    df = len(values) - 1
    t = T975[max(k for k in T975 if k <= df)]
    return t * statistics.stdev(values) / len(values) ** 0.5


def summarize(phases: list[dict[str, Any]], args: argparse.Namespace, model: Path) -> dict[str, Any]:
    off = [p for p in phases if not p["scraping"]]
    on = [p for p in phases if p["scraping"]]
    kinds: dict[str, dict[str, Any]] = {}
    for name, group in (("off", off), ("on", on)):
        rates = [p["tokens_per_s"] for p in group]
        lat = [ms for p in group for ms in p["latencies_ms"]]
        kinds[name] = {"tokens_per_s": [round(r, 2) for r in rates], "mean": round(statistics.mean(rates), 2),
                       "min": round(min(rates), 2), "max": round(max(rates), 2), "stdev": round(spread(rates), 2),
                       "latency_p50_ms": pct(lat, 50), "latency_p95_ms": pct(lat, 95),
                       "requests": len(lat), "tokens": sum(p["tokens"] for p in group),
                       "daemon_cpu_ms": [round(p["daemon_cpu_ms"]) for p in group]}
    scrape_ms = [ms for p in on for ms in p["scrape_ms"]]
    sizes = [b for p in on for b in p["scrape_bytes"]]
    on_seconds = sum(p["seconds"] for p in on)
    # Paired per round: the rounds' own on-vs-off difference, whose spread is the noise.
    paired = [(b["tokens_per_s"] - a["tokens_per_s"]) / a["tokens_per_s"] * 100 for a, b in zip(off, on)]
    off_mean = kinds["off"]["mean"]
    # The daemon's CPU time in "on" phases over the paired "off" phase, per scrape served.
    extra_cpu = [b["daemon_cpu_ms"] - a["daemon_cpu_ms"] for a, b in zip(off, on)]
    return {
        "model": model.name, "concurrent": args.concurrent, "tokens": args.tokens, "rounds": args.rounds,
        "batches": args.batches, "interval_ms": args.interval_ms, "phases": kinds,
        "diff_pct": round((kinds["on"]["mean"] - off_mean) / off_mean * 100, 2),
        "paired_diff_pct": [round(d, 2) for d in paired],
        "paired_diff_pct_mean": round(statistics.mean(paired), 2),
        "paired_diff_pct_stdev": round(spread(paired), 2),
        "paired_diff_pct_ci95": round(ci95(paired), 2),
        "off_spread_pct": round((kinds["off"]["max"] - kinds["off"]["min"]) / off_mean * 100, 2),
        "off_stdev_pct": round(kinds["off"]["stdev"] / off_mean * 100, 2),
        "latency_p50_diff_pct": round((kinds["on"]["latency_p50_ms"] - kinds["off"]["latency_p50_ms"])
                                      / kinds["off"]["latency_p50_ms"] * 100, 2),
        "scrapes": len(scrape_ms), "scrapes_expected": int(on_seconds * 1000 / args.interval_ms),
        "scrape_errors": sum(len(p["scrape_errors"]) for p in on),
        "scrape_ms": {"p50": pct(scrape_ms, 50), "p95": pct(scrape_ms, 95),
                      "max": round(max(scrape_ms), 2) if scrape_ms else None,
                      "mean": round(statistics.mean(scrape_ms), 2) if scrape_ms else None},
        "daemon_cpu_ms_per_scrape": round(sum(extra_cpu) / len(scrape_ms), 2) if scrape_ms else None,
        "scraper_cpu_ms_per_scrape": round(sum(p["scraper_cpu_ms"] for p in on) / len(scrape_ms), 2) if scrape_ms else None,
        "scrape_bytes": {"min": min(sizes) if sizes else None, "max": max(sizes) if sizes else None},
        # The scraper's share of the "on" wall time spent waiting on scrapes (an upper bound of
        # the listener's busy time: it includes the connection set-up and this script's side).
        "scrape_busy_pct": round(sum(scrape_ms) / (on_seconds * 1000) * 100, 2) if on_seconds else None,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    k = result["phases"]
    s = result["scrape_ms"]
    b = result["scrape_bytes"]

    def row(name: str, label: str) -> str:
        p = k[name]
        rates = ", ".join(f"{r:.1f}" for r in p["tokens_per_s"])
        return (f"| {label} | {p['mean']:.1f} | {p['min']:.1f} .. {p['max']:.1f} (sd {p['stdev']:.1f}) | {rates} "
                f"| {p['latency_p50_ms']:.0f} | {p['latency_p95_ms']:.0f} |")

    paired = ", ".join(f"{d:+.1f}" for d in result["paired_diff_pct"])
    on_label = f"every {result['interval_ms']:g} ms"
    mean, half = result["paired_diff_pct_mean"], result["paired_diff_pct_ci95"]
    within = abs(mean) <= half  # the interval holds 0
    cores = os.cpu_count() or 1
    cpu_share = ((result["daemon_cpu_ms_per_scrape"] or 0) + (result["scraper_cpu_ms_per_scrape"] or 0)) \
        / (result["interval_ms"] * cores) * 100
    return (
        f"\n## {dt.date.today()} — `{' '.join(['bench/metrics_scrape.py', *sys.argv[1:]])}`\n\n"
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}; "
        f"model `{result['model']}`; {result['rounds']} rounds × (off, on) phases alternating in order, "
        f"each {result['batches']} batches of {result['concurrent']} concurrent requests "
        f"(max_tokens {result['tokens']}, greedy, inference.max_batch {result['concurrent']}); "
        f"\"on\": GET /metrics every {result['interval_ms']:g} ms\n\n"
        "| scraping | tokens/s (mean) | across rounds | per round | latency p50 (ms) | latency p95 (ms) |\n"
        "|---|---|---|---|---|---|\n"
        f"{row('off', 'off')}\n{row('on', on_label)}\n\n"
        f"On vs off: **{result['diff_pct']:+.1f} %** tokens/s (means of the kinds); paired per round "
        f"{paired} %, mean **{mean:+.1f} % ± {half:.1f} %** (95 % CI, Student's t, sd "
        f"{result['paired_diff_pct_stdev']:.1f}); the \"off\" phases alone spread "
        f"{result['off_spread_pct']:.1f} % min..max, sd {result['off_stdev_pct']:.1f} % — "
        + ("the interval holds 0: **within noise**" if within else "the interval excludes 0: **a measurable cost**")
        + f"; latency p50 {result['latency_p50_diff_pct']:+.1f} %.\n\n"
        f"Scrape cost: **p50 {s['p50']} ms, p95 {s['p95']} ms**, max {s['max']} ms, mean {s['mean']} ms "
        f"({result['scrapes']} scrapes of {result['scrapes_expected']} due, {result['scrape_errors']} failed; "
        f"{b['min']}..{b['max']} bytes each; scraping kept the scraper busy {result['scrape_busy_pct']} % "
        f"of the \"on\" time). Times are the scraper's: a new connection, the request, the whole body. "
        f"The daemon process (not its inference child) used {result['daemon_cpu_ms_per_scrape']} ms more CPU "
        f"per scrape in \"on\" phases than in the paired \"off\" ones (daemon CPU ms per phase: off "
        f"{k['off']['daemon_cpu_ms']}, on {k['on']['daemon_cpu_ms']}); the scraper thread used "
        f"{result['scraper_cpu_ms_per_scrape']} ms CPU per scrape. Together that is {cpu_share:.1f} % of this "
        f"machine's {cores} cores taken from inference while scraping every {result['interval_ms']:g} ms, "
        "the slowdown to expect when the scraper runs on the same machine and the model keeps every core busy.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny or a model folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5, help="batches per phase")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    model = build_model(args.model) if args.model in ("tiny", "smollm2") else Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="metrics-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    broker = Broker()
    broker.start()
    client = Client(broker.port)
    client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    agent = AgentProcess(work, broker.port, model, metrics__listen=f"127.0.0.1:{port}",
                         inference__max_batch=args.concurrent, model__max_new_tokens=max(64, args.tokens),
                         limits__queue_size=max(8, args.concurrent))
    phases: list[dict[str, Any]] = []
    try:
        agent.start(client)
        client.subscribe(agent.response_topic)
        batch(client, agent, args.concurrent, args.tokens)  # warm-up: the batching engine, the paths
        scrape_once(url)
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for scraping in order:
                p = phase(client, agent, args, url, scraping)
                phases.append(p)
                print(f"round {r + 1} {'on ' if scraping else 'off'}: {p['tokens_per_s']:.1f} tokens/s, "
                      f"{p['seconds']:.1f} s, {len(p['scrape_ms'])} scrapes", file=sys.stderr, flush=True)
        final = scrape_once(url).decode()
    finally:
        if agent.proc is not None:
            agent.stop()
        client.close()
        broker.close()
    # The off/on lists in round order, for the paired differences.
    phases.sort(key=lambda p: p["scraping"])  # stable: keeps the round order within each kind
    result = summarize(phases, args, model)
    result["agent_requests_counted"] = sum(float(line.rsplit(" ", 1)[1]) for line in final.splitlines()
                                           if line.startswith("edge_agent_requests_total"))
    if args.json:
        print(json.dumps(result, indent=2))
    text = report(result, args)
    print(text)
    if not args.no_append:
        out = REPO / "bench" / "METRICS.md"
        if not out.exists():
            out.write_text("# What Prometheus scraping costs\n\n"
                           "Written by `bench/metrics_scrape.py`; newest last.\n")
        with out.open("a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
