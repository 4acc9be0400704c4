"""A real Prometheus for the tests: its own process on a free loopback port, its own storage in a
temp folder, scraping the given targets every second; queried through its HTTP API (urllib).
Also `promtool check metrics`, the linter Prometheus ships, for one scrape's text.

The binaries come from the Debian package `prometheus` (scripts/setup.sh): /usr/bin/prometheus
and /usr/bin/promtool."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from support import free_port

READY_TIMEOUT_S = 15.0  # ready in ~0.1 s on an idle machine; the first scrape comes ~5 s later
POLL_S = 0.1


class PrometheusError(RuntimeError):
    """Prometheus refused a query or did not start; the message carries its own words."""


def _exe(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)


class Prometheus:
    """A Prometheus server scraping `targets` ("host:port") at `metrics_path` every
    `scrape_interval_s`, as job `job`; each target keeps its address as the `instance` label."""

    def __init__(self, targets: Sequence[str], *, job: str = "edge-agent",
                 metrics_path: str = "/metrics", scrape_interval_s: float = 1.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="prom-"))
        self.log_path = self.dir / "prometheus.log"
        self.config_path = self.dir / "prometheus.yml"
        interval = f"{int(scrape_interval_s * 1000)}ms"
        # JSON is YAML: no YAML library needed to write the file.
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": interval},
            "scrape_configs": [{"job_name": job, "metrics_path": metrics_path,
                                "static_configs": [{"targets": list(targets)}]}],
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start the server and wait until GET /-/ready answers 200."""
        exe = _exe("prometheus")
        if exe is None:
            raise PrometheusError("prometheus is not installed (scripts/setup.sh installs it)")
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [exe, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus was not ready within {timeout} s: {self.log_tail()}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                doc = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a bad expression, with Prometheus's reason
            doc = json.loads(exc.read() or b"{}")
            raise PrometheusError(f"{doc.get('errorType')}: {doc.get('error')}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"{doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: for a vector, its series [{"metric": {labels}, "value": [t, "v"]}];
        a scalar or string result comes back as one such entry with empty labels."""
        data = self._api("query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float:
        """The value of the one series `expr` returns (PrometheusError if not exactly one)."""
        result = self.query(expr)
        if len(result) != 1:
            raise PrometheusError(f"{expr!r} returned {len(result)} series, not 1: {result}")
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 15.0) -> list[dict[str, Any]]:
        """Query `expr` until `predicate(result)` holds; return that result. TimeoutError names the
        last result and the targets' health, the usual reason (a target down, a bad scrape)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
                raise TimeoutError(f"{expr!r}: last result {result}; targets {health}")
            time.sleep(POLL_S)

    def wait_scraped(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until every target has been scraped once (up or down); return the targets.
        Prometheus hands new targets to its scrapers on a 5 s tick: the first scrape comes
        ~5 s after start, whatever the scrape interval."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.targets()
            if targets and all(t["health"] != "unknown" for t in targets):
                return targets
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not scraped within {timeout} s: {targets}")
            time.sleep(POLL_S)

    def targets(self) -> list[dict[str, Any]]:
        """The active targets: each with scrapeUrl, health ("up"/"down"/"unknown"), lastError,
        labels (job, instance), lastScrape."""
        return self._api("targets", {"state": "active"})["activeTargets"]

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        """Stop the server and remove its folder (config, storage, log)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def running_prometheus(targets: Sequence[str], **kwargs: Any) -> Iterator[Prometheus]:
    """For a fixture: a started, ready Prometheus scraping `targets`; closed at teardown."""
    server = Prometheus(targets, **kwargs)
    try:
        server.start()
        yield server
    finally:
        server.close()


def promtool_check_metrics(text: str) -> tuple[bool, str]:
    """Lint one scrape's text with `promtool check metrics`: (no problem found, what it said).
    promtool exits 0 when clean, 3 for lint problems (a counter without _total, no HELP), 1 when
    the text does not parse."""
    exe = _exe("promtool")
    if exe is None:
        raise PrometheusError("promtool is not installed (scripts/setup.sh installs prometheus)")
    done = subprocess.run([exe, "check", "metrics"], input=text.encode(), capture_output=True,
                          timeout=30)
    output = (done.stdout + done.stderr).decode(errors="replace").strip()
    return done.returncode == 0, output
