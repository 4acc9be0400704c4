"""Stats: the pure collection, and the document on `<prefix>/<device_id>/stats` over MQTT."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Callable

from edge_agent.health.stats import ProcessMeter, RequestStats, Stats, parse_compute_apps, percentile
from support import AgentProcess, Broker, Client


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0


def test_request_stats_windows_are_bounded() -> None:
    stats = RequestStats(window=4)
    for ms in (1000.0, 1000.0, 1.0, 2.0, 3.0, 4.0):
        stats.count("ok", ms)
    stats.count("bad_request")
    stats.decoded(0.0)  # fewer than 2 tokens: no speed to average
    stats.decoded(10.0)
    stats.decoded(30.0)
    summary = stats.summary()
    assert summary["requests"] == {"ok": 6, "bad_request": 1}
    assert summary["latency_ms"] == {"p50": 2.0, "p95": 4.0, "window": 4}
    assert summary["tokens_per_s"] == 20.0


def test_process_meter_and_document() -> None:
    now = [100.0]
    stats = Stats(clock=lambda: now[0])
    meter = ProcessMeter()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn some CPU
        pass
    assert meter.cpu_percent() > 0
    assert (meter.rss_bytes() or 0) > 10_000_000
    now[0] += 12.5
    doc = stats.document(device_id="box1", queue_depth=2, busy_rejected=1,
                         cameras={"front": {"state": "streaming", "fps": 15.0, "last_frame_age_ms": 40,
                                            "frames": 9, "error": None, "motion": "OFF", "zones": {"gate": "ON"}}})
    assert doc["uptime_s"] == 12.5 and doc["device_id"] == "box1"
    assert doc["cameras"] == {"front": {"state": "streaming", "fps": 15.0, "last_frame_age_ms": 40, "motion": "OFF",
                                        "zones": {"gate": "ON"}}}
    assert doc["latency_ms"]["p50"] is None and doc["tokens_per_s"] is None
    if not Path("/proc/driver/nvidia").exists():
        assert "gpu_memory_bytes" not in doc


def test_nvidia_smi_compute_apps() -> None:
    text = "4242, 1536\n17, 100\n4242, 512\n99, [N/A]\n"
    assert parse_compute_apps(text, 4242) == 2048 * 1024 * 1024
    assert parse_compute_apps(text, 5) == 0
    assert parse_compute_apps("", 5) == 0


def test_stats_over_mqtt(broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, stats_interval_s=0.5)
    stats_topic = f"{agent.prefix}/{agent.device_id}/stats"
    client.subscribe(agent.response_topic)
    for rid in ("s1", "s2"):
        client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 8}))
        assert client.wait_for(lambda d, rid=rid: d.get("id") == rid)["ok"]
    client.publish(agent.request_topic, "not json")
    client.publish(agent.request_topic, json.dumps({"id": "s3", "prompt": "hi", "colour": "red"}))
    client.wait_for(lambda d: d.get("id") == "s3")
    client.subscribe(stats_topic)
    doc = client.wait_for(lambda d: "uptime_s" in d and d["requests"].get("bad_request") == 2, 10)
    assert doc["device_id"] == agent.device_id
    assert doc["requests"] == {"ok": 2, "bad_request": 2}
    assert doc["latency_ms"]["p50"] > 0 and doc["latency_ms"]["p95"] >= doc["latency_ms"]["p50"]
    assert doc["latency_ms"]["window"] == 2
    assert doc["tokens_per_s"] > 0
    assert doc["queue_depth"] == 0 and doc["busy_rejected"] == 0
    assert doc["rss_bytes"] > 10_000_000 and doc["cpu_percent"] >= 0
    assert doc["delivery"] == {"outbox": 0, "outbox_dropped": 0, "store_failures": 0}  # every answer acknowledged
    assert doc["inference_restarts"] == 0
    assert doc["cameras"] == {} and doc["since"].endswith("Z")
    first = doc["uptime_s"]
    later = client.wait_for(lambda d: "uptime_s" in d and d["uptime_s"] > first, 5)
    assert later["uptime_s"] - first < 3

    assert agent.stop(signal.SIGTERM) == 0
    late = Client(broker.port)  # not retained: a new subscriber gets nothing
    try:
        late.subscribe(stats_topic)
        time.sleep(0.3)
        assert late.drain() == []
    finally:
        late.close()


def test_no_stats_when_the_interval_is_0(broker: Broker, client: Client,
                                          start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, stats_interval_s=0)
    client.subscribe(f"{agent.prefix}/{agent.device_id}/stats")
    time.sleep(2.5)
    assert [d for d in client.drain() if "uptime_s" in d] == []
