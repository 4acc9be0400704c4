"""A real Prometheus server (Debian's `prometheus`) scrapes a real agent with a camera on a live
stream; what it stored is read back through its HTTP query API, as a fleet's monitoring would.
The scrape passes `promtool check metrics`, and every metric the Grafana dashboard names exists."""

from __future__ import annotations

import urllib.request
from typing import Callable

from prometheus import Prometheus, promtool_check_metrics
from prometheus_client.parser import text_string_to_metric_families
from support import AgentProcess, Broker, Client, ask, free_port
from test_grafana_dashboard import DASHBOARD, metric_names_in_dashboard
from video import UdpStream

REQUESTS = 5
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_prometheus_scrapes_requests_tokens_and_the_camera(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], stream: UdpStream) -> None:
    port = free_port()
    with Prometheus([f"127.0.0.1:{port}"]) as prometheus:
        agent = start_agent(broker, client, metrics__listen=f"127.0.0.1:{port}",
                            cameras={"front": {"source": stream.url}})
        client.subscribe(agent.response_topic)
        answers = [ask(client, agent, {"prompt": f"count to {n}", "max_tokens": 4}) for n in range(REQUESTS)]
        assert all(doc["ok"] for doc in answers)
        assert not ask(client, agent, {"prompt": ""})["ok"]

        ok = 'edge_agent_requests_total{outcome="ok"}'
        prometheus.wait_for(ok, lambda r: bool(r) and float(r[0]["value"][1]) == REQUESTS, timeout=30)
        assert prometheus.value('edge_agent_requests_total{outcome="bad_request"}') == 1
        # every request that made a token is in the TTFT histogram (the warm-up is not a request)
        assert prometheus.value("edge_agent_time_to_first_token_seconds_count") == REQUESTS
        assert prometheus.value("edge_agent_generated_tokens_total") >= REQUESTS * 4
        assert prometheus.value("edge_agent_ready") == 1
        fps = prometheus.wait_for('edge_agent_camera_fps{camera="front"}',
                                  lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=30)
        assert abs(float(fps[0]["value"][1]) - stream.fps) <= stream.fps * 0.35, fps

        text = scrape_text(port)
        ok_lint, output = promtool_check_metrics(text)
        assert ok_lint, output

        scraped = {family.name + ("_total" if family.type == "counter" else "")
                   for family in text_string_to_metric_families(text)}
        missing = metric_names_in_dashboard(DASHBOARD) - scraped
        assert not missing, f"the dashboard names metrics the agent does not have: {sorted(missing)}"
