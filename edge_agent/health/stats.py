"""Stats an operator graphs per box: request outcomes, latency, decode speed, process load.

Pure collection; reports.py publishes the document on `<prefix>/<device_id>/stats`
(docs/protocol.md, "Stats"). Every window is bounded, so a box up for months holds the same
few kilobytes as one up for minutes.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterable

from edge_agent.health.metrics import Metrics
from edge_agent.health.status import utc_now
from edge_agent.log import get_logger

log = get_logger("stats")
WINDOW = 256  # recent answers the latency percentiles and the decode speed are taken over
NVIDIA_SMI_TIMEOUT_S = 2.0
CAMERA_FIELDS = ("state", "fps", "last_frame_age_ms", "motion", "zones")


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class RequestStats:
    """Outcome counters and bounded windows of recent latencies and decode speeds.

    Thread-safe: the MQTT thread counts rejections, the workers count answers."""

    def __init__(self, window: int = WINDOW, metrics: Metrics | None = None) -> None:
        self._metrics = metrics  # Prometheus sees the same counts
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._latency_ms: deque[float] = deque(maxlen=window)
        self._tokens_per_s: deque[float] = deque(maxlen=window)

    def count(self, outcome: str, latency_ms: float | None = None) -> None:
        """One request finished with `outcome` ("ok" or an error code); latency for answers."""
        with self._lock:
            self._outcomes[outcome] += 1
            if latency_ms is not None:
                self._latency_ms.append(latency_ms)
        if self._metrics is not None:
            self._metrics.request_done(outcome, None if latency_ms is None else latency_ms / 1000)

    def decoded(self, tokens_per_s: float) -> None:
        """Decode speed of one generation; 0 (fewer than 2 tokens) says nothing and is skipped."""
        if tokens_per_s > 0:
            with self._lock:
                self._tokens_per_s.append(tokens_per_s)

    def outcomes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._outcomes)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            latencies = list(self._latency_ms)
            speeds = list(self._tokens_per_s)
            outcomes = dict(self._outcomes)
        p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
        return {
            "requests": outcomes,
            "latency_ms": {"p50": _round(p50), "p95": _round(p95), "window": len(latencies)},
            "tokens_per_s": _round(sum(speeds) / len(speeds)) if speeds else None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class ProcessMeter:
    """Resident memory and CPU use of this process (Linux /proc; `None` where unreadable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = (clock(), _cpu_seconds())

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE")

    def cpu_percent(self) -> float:
        """CPU time over wall time since the previous call (or creation); 100 = one core busy."""
        now, cpu = self._clock(), _cpu_seconds()
        (then, cpu_then), self._last = self._last, (now, cpu)
        return round(100 * (cpu - cpu_then) / (now - then), 1) if now > then else 0.0


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class GpuMemory:
    """This process's memory on NVIDIA GPUs, as nvidia-smi reports it.

    Present only where the NVIDIA driver is (`/proc/driver/nvidia`) and nvidia-smi runs; one
    failure turns it off for good, so a broken tool does not cost 2 s every interval."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid or os.getpid()
        self._exe = shutil.which("nvidia-smi") if Path("/proc/driver/nvidia").exists() else None

    @property
    def present(self) -> bool:
        return self._exe is not None

    def used_bytes(self) -> int | None:
        if self._exe is None:
            return None
        try:
            out = subprocess.run([self._exe, "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("stats.nvidia_smi_failed", error=str(exc))
            self._exe = None
            return None
        return parse_compute_apps(out, self._pid)


def parse_compute_apps(text: str, pid: int) -> int:
    """Bytes used by `pid` in nvidia-smi's `pid, used_memory` (MiB) CSV; 0 if it is not listed."""
    total = 0
    for line in text.splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            total += int(fields[1]) * 1024 * 1024
    return total


class Stats:
    """Everything the stats document holds that the agent does not pass in."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, metrics: Metrics | None = None) -> None:
        self.requests = RequestStats(metrics=metrics)
        self._clock = clock
        self._started = clock()
        self._since = utc_now()
        self._meter = ProcessMeter(clock)
        self._gpu = GpuMemory()

    def document(self, *, device_id: str, queue_depth: int, busy_rejected: int,
                 cameras: dict[str, dict[str, Any]]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "device_id": device_id,
            "uptime_s": round(self._clock() - self._started, 1),
            **self.requests.summary(),
            "queue_depth": queue_depth,
            "busy_rejected": busy_rejected,
            "rss_bytes": self._meter.rss_bytes(),
            "cpu_percent": self._meter.cpu_percent(),
            "cameras": {name: {k: info.get(k) for k in CAMERA_FIELDS} for name, info in cameras.items()},
            "since": self._since,
        }
        gpu = self._gpu.used_bytes()
        if gpu is not None:
            doc["gpu_memory_bytes"] = gpu
        return doc
