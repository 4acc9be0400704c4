"""The Prometheus harness (tests/prometheus.py) against a tiny target: a static text-format page
served by http.server, scraped by a real Prometheus; and promtool's linter on good and bad text."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from prometheus import Prometheus, PrometheusError, promtool_check_metrics, running_prometheus
from support import free_port

GOOD = """# HELP demo_metric_total Demo events.
# TYPE demo_metric_total counter
demo_metric_total 3
"""


class StaticTarget:
    """A /metrics page whose text a test may change."""

    def __init__(self) -> None:
        self.text = GOOD
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = target.text.encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="static-target", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def target() -> Iterator[StaticTarget]:
    t = StaticTarget()
    yield t
    t.close()


@pytest.fixture(scope="module")
def down_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def prom(target: StaticTarget, down_address: str) -> Iterator[Prometheus]:
    yield from running_prometheus([target.address, down_address], job="demo")


def test_scrapes_the_page_and_answers_queries(prom: Prometheus, target: StaticTarget) -> None:
    prom.wait_scraped()
    result = prom.wait_for("demo_metric_total", lambda r: len(r) == 1, timeout=5)
    assert float(result[0]["value"][1]) == 3
    assert result[0]["metric"] == {"__name__": "demo_metric_total", "job": "demo", "instance": target.address}
    assert prom.value("demo_metric_total") == 3


def test_follows_a_changed_value(prom: Prometheus, target: StaticTarget) -> None:
    prom.wait_for("demo_metric_total", lambda r: len(r) == 1, timeout=10)
    target.text = GOOD.replace(" 3\n", " 5\n")
    try:
        prom.wait_for("demo_metric_total", lambda r: r and float(r[0]["value"][1]) == 5, timeout=10)
    finally:
        target.text = GOOD


def test_targets_report_health(prom: Prometheus, target: StaticTarget, down_address: str) -> None:
    health = {t["labels"]["instance"]: t["health"] for t in prom.wait_scraped()}
    assert health == {target.address: "up", down_address: "down"}
    assert {r["metric"]["instance"]: r["value"][1] for r in prom.query("up")} == {
        target.address: "1", down_address: "0"}


def test_a_bad_expression_raises_with_prometheus_reason(prom: Prometheus) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("rate(demo_metric_total[")


def test_scalar_results_and_value(prom: Prometheus) -> None:
    assert prom.value("1 + 1") == 2
    with pytest.raises(PrometheusError, match="0 series"):
        prom.value("no_such_metric")


def test_wait_for_times_out_with_the_last_result(prom: Prometheus) -> None:
    with pytest.raises(TimeoutError, match="no_such_metric"):
        prom.wait_for("no_such_metric", lambda r: bool(r), timeout=0.3)


def test_promtool_passes_a_good_scrape() -> None:
    ok, output = promtool_check_metrics(GOOD)
    assert ok, output


@pytest.mark.parametrize("text, complaint", [
    ("# HELP demo_metric Demo.\n# TYPE demo_metric counter\ndemo_metric 3\n", '"_total" suffix'),
    ("# TYPE demo_metric_total counter\ndemo_metric_total 3\n", "no help text"),
    ("demo metric{ 3\n", "parsing error"),
])
def test_promtool_flags_a_bad_scrape(text: str, complaint: str) -> None:
    ok, output = promtool_check_metrics(text)
    assert not ok
    assert complaint in output
