"""Prometheus metrics in one private registry. The request path feeds counters and histograms
(a few increments per request, each under prometheus-client's own short lock); everything else
is read from the parts when Prometheus scrapes (`Live`, gathered by a function the daemon
gives), so a scrape never takes the request path's locks for longer than a copy."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent import __version__

PREFIX = "edge_agent"
# Buckets like vLLM's, trimmed to what an edge box sees (seconds).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
WATCH_RESULTS = ("published", "unchanged", "skipped_running", "skipped_cooldown", "failed")


@dataclass
class RemoteServer:
    role: str  # "backend" or "overflow": the `server` label (few values, never a URL)
    outcomes: dict[str, int]
    circuit_open: bool


@dataclass
class Live:
    """What a scrape reads from the running parts, gathered at once."""

    ready: bool
    broker_connected: bool
    queue_depth: int
    requests_running: int
    outbox_messages: int | None
    model: str
    provider: str
    batching: str
    inference_pid: int | None
    inference_restarts: int
    fleet_handed_back: int
    cameras: dict[str, dict[str, Any]] = field(default_factory=dict)
    watch: dict[str, dict[str, Any]] = field(default_factory=dict)
    remote: list[RemoteServer] = field(default_factory=list)
    memory: Any = None  # inference.memory.MemoryPlan of the local model, None without one
    cache_reserved_bytes: int = 0  # requests' caches held in the inference process now


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(f"{PREFIX}_requests", "Requests answered, by outcome (ok or the error code)",
                                 ["outcome"], registry=r)
        self._duration = Histogram(f"{PREFIX}_request_duration_seconds", "From receipt to answer, answered requests",
                                   buckets=DURATION_BUCKETS, registry=r)
        self._ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From the start of generation to the first token",
                               buckets=TTFT_BUCKETS, registry=r)
        self._queue = Histogram(f"{PREFIX}_queue_wait_seconds", "From receipt until a worker took the request",
                                buckets=QUEUE_BUCKETS, registry=r)
        self._tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Decode time per token after the first",
                               buckets=TPOT_BUCKETS, registry=r)
        self._prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of generations", registry=r)
        self._cached_tokens = Counter(f"{PREFIX}_cached_prompt_tokens", "Prompt tokens continued from a kept "
                                      "cache instead of computed again (prefix reuse)", registry=r)
        self._generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", registry=r)
        self._build = _build_labels()

    # --- fed by the request path ---------------------------------------------------------
    def request_done(self, outcome: str, duration_s: float | None) -> None:
        self._requests.labels(outcome).inc()
        if duration_s is not None:
            self._duration.observe(duration_s)

    def generated(self, queue_s: float, ttft_s: float | None, generate_s: float,
                  prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        self._queue.observe(max(0.0, queue_s))
        if ttft_s is not None and completion_tokens > 0:
            self._ttft.observe(ttft_s)
            if completion_tokens > 1:
                self._tpot.observe(max(0.0, generate_s - ttft_s) / (completion_tokens - 1))
        self._prompt_tokens.inc(prompt_tokens)
        self._cached_tokens.inc(cached_tokens)
        self._generated_tokens.inc(completion_tokens)

    # --- read at scrape time ---------------------------------------------------------------
    def read_live(self, read: Callable[[], Live]) -> None:
        """Gauges and running counts, read from the parts on each scrape."""
        self.registry.register(_LiveCollector(read, self._build))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


def _build_labels() -> dict[str, str]:
    version = ""
    for dist in ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"):
        try:
            version = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return {"version": __version__, "onnxruntime_genai": version}


def resident_bytes(pid: int | None) -> int | None:
    """A process's resident memory (Linux /proc); None when unknown or gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Live], build: dict[str, str]) -> None:
        self._read = read
        self._build = build

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: its families depend on what is configured

    def collect(self) -> Iterator[Metric]:
        live = self._read()
        yield _gauge("queue_depth", "Requests waiting in the queue", live.queue_depth)
        yield _gauge("requests_running", "Requests generating now", live.requests_running)
        yield _gauge("broker_connected", "1 while the MQTT broker link is connected", int(live.broker_connected))
        yield _gauge("ready", "1 while the agent is ready (model loaded, taking requests)", int(live.ready))
        if live.outbox_messages is not None:
            yield _gauge("outbox_messages", "Answers stored and not yet confirmed by the broker", live.outbox_messages)
        yield _labelled_gauge("model_info", "The model and provider answering (always 1)",
                              {"model": live.model, "provider": live.provider, "batching": live.batching}, 1)
        yield _labelled_gauge("build_info", "The agent's and the runtime's versions (always 1)", self._build, 1)
        rss = resident_bytes(live.inference_pid)
        if rss is not None:
            yield _gauge("inference_resident_memory_bytes", "Resident memory of the inference process", rss)
        yield _counter("inference_restarts", "Inference processes replaced after they died", live.inference_restarts)
        yield _counter("fleet_handed_back", "Fleet requests passed back to the pool (queue full)",
                       live.fleet_handed_back)
        yield from _cameras(live.cameras)
        yield from _watch(live.watch)
        yield from _remote(live.remote)
        if live.memory is not None:
            yield from _memory(live.memory, live.cache_reserved_bytes)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _labelled_gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _cameras(cameras: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    fps = GaugeMetricFamily(f"{PREFIX}_camera_fps", "Frames per second captured lately", labels=["camera"])
    age = GaugeMetricFamily(f"{PREFIX}_camera_frame_age_seconds", "Age of the freshest frame", labels=["camera"])
    reconnects = CounterMetricFamily(f"{PREFIX}_camera_reconnects", "Times the camera was opened again",
                                     labels=["camera"])
    motion = GaugeMetricFamily(f"{PREFIX}_camera_motion", "1 while the camera sees motion", labels=["camera"])
    zones = GaugeMetricFamily(f"{PREFIX}_zone_motion", "1 while the zone sees motion", labels=["camera", "zone"])
    for name, info in cameras.items():
        for zone, state in (info.get("zones") or {}).items():
            zones.add_metric([name, zone], 1.0 if state == "ON" else 0.0)
        fps.add_metric([name], float(info.get("fps") or 0.0))
        if info.get("last_frame_age_ms") is not None:
            age.add_metric([name], info["last_frame_age_ms"] / 1000)
        reconnects.add_metric([name], float(info.get("reconnects") or 0))
        if info.get("motion") is not None:
            motion.add_metric([name], 1.0 if info["motion"] == "ON" else 0.0)
    yield from (fps, age, reconnects, motion, zones)


def _watch(rules: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    runs = CounterMetricFamily(f"{PREFIX}_watch_runs", "Watch rule runs, by result", labels=["rule", "result"])
    for name, info in rules.items():
        for result in WATCH_RESULTS:
            runs.add_metric([name, result], float(info.get(result) or 0))
    yield runs


def _remote(servers: list[RemoteServer]) -> Iterator[Metric]:
    requests = CounterMetricFamily(f"{PREFIX}_remote_requests", "Requests to OpenAI-compatible servers, by outcome",
                                   labels=["server", "outcome"])
    circuit = GaugeMetricFamily(f"{PREFIX}_remote_circuit_open", "1 while the server's circuit is open",
                                labels=["server"])
    for server in servers:
        for outcome, count in sorted(server.outcomes.items()):
            requests.add_metric([server.role, outcome], float(count))
        circuit.add_metric([server.role], 1.0 if server.circuit_open else 0.0)
    yield from (requests, circuit)


def _memory(plan: Any, reserved: int) -> Iterator[Metric]:
    yield _gauge("memory_budget_bytes", "The memory plan's budget for the model and its caches", plan.budget_bytes)
    yield _gauge("model_weights_bytes", "The model files' size", plan.weights_bytes)
    yield _gauge("kv_cache_bytes_per_token", "Cache bytes one token of context takes", plan.kv_bytes_per_token)
    yield _gauge("cache_reserved_bytes", "Caches held now: the batching engine's and running requests'",
                 plan.batch_cache_bytes + reserved)
