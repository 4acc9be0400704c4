"""The Grafana dashboard (contrib/grafana/edge-agent.json): it parses, every panel queries
something, every query is PromQL a real Prometheus accepts, and `metric_names_in_dashboard`
lists the metrics it uses (a live-scrape test compares them with what the agent serves)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from prometheus import Prometheus, running_prometheus
from support import REPO

DASHBOARD = REPO / "contrib" / "grafana" / "edge-agent.json"

_METRIC = re.compile(r"\bedge_agent_[A-Za-z0-9_:]+")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")

# Grafana's variables, replaced by values Prometheus accepts, to check the queries as PromQL.
_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$device": ".*"}

# Every metric the dashboard shows (issue 19): a metric added to the agent belongs here and on it.
EXPECTED = {
    "edge_agent_requests_total", "edge_agent_request_duration_seconds",
    "edge_agent_time_to_first_token_seconds", "edge_agent_queue_wait_seconds",
    "edge_agent_time_per_output_token_seconds", "edge_agent_prompt_tokens_total",
    "edge_agent_generated_tokens_total", "edge_agent_queue_depth", "edge_agent_requests_running",
    "edge_agent_broker_connected", "edge_agent_outbox_messages", "edge_agent_ready",
    "edge_agent_model_info", "edge_agent_build_info", "edge_agent_inference_resident_memory_bytes",
    "edge_agent_inference_restarts_total", "edge_agent_camera_fps", "edge_agent_camera_frame_age_seconds",
    "edge_agent_camera_reconnects_total", "edge_agent_camera_motion", "edge_agent_zone_motion",
    "edge_agent_cached_prompt_tokens_total", "edge_agent_watch_runs_total",
    "edge_agent_remote_requests_total", "edge_agent_remote_circuit_open",
    "edge_agent_fleet_handed_back_total",
}


def dashboard_panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data: rows are left out, the panels of a collapsed row are in."""
    for panel in doc.get("panels", []):
        if panel.get("type") == "row":
            yield from dashboard_panels(panel)
        else:
            yield panel


def dashboard_exprs(path: Path) -> list[str]:
    doc = json.loads(Path(path).read_text())
    return [t["expr"] for p in dashboard_panels(doc) for t in p.get("targets", []) if t.get("expr")]


def metric_names_in_dashboard(path: Path) -> set[str]:
    """Every edge_agent_* metric a panel query of the dashboard at `path` uses, named as a scrape
    names its samples' family: a histogram by its base name (…_bucket, _sum, _count removed),
    a counter with its _total."""
    names = set()
    for expr in dashboard_exprs(path):
        names.update(_HISTOGRAM_SUFFIX.sub("", name) for name in _METRIC.findall(expr))
    return names


def test_extraction_from_a_sample(tmp_path: Path) -> None:
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    sample = {"panels": [
        {"type": "timeseries", "targets": [
            {"refId": "A", "datasource": ds, "expr": 'histogram_quantile(0.95, sum by (le) '
             '(rate(edge_agent_request_duration_seconds_bucket{instance=~"$device", job="edge-agent"}[5m])))'},
            {"refId": "B", "expr": "rate(edge_agent_queue_wait_seconds_sum[5m]) / "
             "rate(edge_agent_queue_wait_seconds_count[5m])"}]},
        {"type": "row", "collapsed": True, "panels": [
            {"type": "stat", "targets": [{"refId": "A", "expr": "sum(edge_agent_requests_total) + up"}]}]},
        {"type": "text", "options": {"content": "edge_agent_not_a_query"}},
    ]}
    path = tmp_path / "sample.json"
    path.write_text(json.dumps(sample))
    assert metric_names_in_dashboard(path) == {
        "edge_agent_request_duration_seconds", "edge_agent_queue_wait_seconds", "edge_agent_requests_total"}


def test_the_dashboard_shows_every_metric() -> None:
    assert metric_names_in_dashboard(DASHBOARD) == EXPECTED


def test_the_dashboard_is_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["device"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    panels = list(dashboard_panels(doc))
    ids = [p["id"] for p in panels] + [p["id"] for p in doc["panels"] if p["type"] == "row"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["targets"], f"{panel['title']}: no query"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds repeat"
        for t in panel["targets"]:
            assert t["expr"].strip(), f"{panel['title']}: an empty query"
            assert '=~"$device"' in t["expr"], f"{panel['title']}: not filtered by device: {t['expr']}"


def test_panels_stay_inside_the_grid() -> None:
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]


@pytest.fixture(scope="module")
def prom() -> Iterator[Prometheus]:
    yield from running_prometheus([])


def test_every_query_is_promql_prometheus_accepts(prom: Prometheus) -> None:
    for expr in dashboard_exprs(DASHBOARD):
        for variable, value in sorted(_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable left in {expr}"
        prom.query(expr)  # PrometheusError (bad_data) when it does not parse
