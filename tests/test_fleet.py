"""A pool of agents sharing one request stream through the broker (`mqtt.shared_group`)."""

from __future__ import annotations

import json
import queue
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from faults import fault_hooks_env
from support import AgentProcess, Broker, Client, next_stats

FLEET_REQUEST = "edge-agent/fleet/request"
FLEET_RESPONSE = "edge-agent/fleet/response"


def done_ids(agent: AgentProcess) -> list[str]:
    return [line["request_id"] for line in agent.log_lines() if line.get("event") == "request.done"]


def collect(client: Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    answers: dict[str, dict[str, Any]] = {}
    while len(answers) < len(ids):
        doc = client.wait_for(lambda d: "id" in d and "ok" in d)
        assert doc["id"] not in answers, f"{doc['id']} answered twice"
        answers[doc["id"]] = doc
    return answers


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_each_fleet_request_is_answered_once_by_one_of_the_pool(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], protocol: str) -> None:
    # The burst arrives faster than the tiny model answers: each member's queue holds its share
    # (on 3.1.1 a full member would answer busy; passing on is tested below).
    # One group per run: a killed member's persistent session keeps its share queued until it
    # comes back or the session expires (mqtt.session_expiry_s), by design.
    pool = [start_agent(broker, client, mqtt__shared_group=f"pool-a{protocol.replace('.', '')}", mqtt__protocol=protocol,
                        limits__queue_size=30) for _ in range(3)]
    client.subscribe(FLEET_RESPONSE)
    ids = [f"fleet-{protocol}-{i}" for i in range(30)]
    for rid in ids:
        client.publish(FLEET_REQUEST, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4}))
    answers = collect(client, ids)
    assert all(a["ok"] for a in answers.values()), [a for a in answers.values() if not a["ok"]][:3]
    handled = {agent.device_id: done_ids(agent) for agent in pool}
    everyone = [rid for rids in handled.values() for rid in rids]
    assert sorted(everyone) == sorted(ids), "each request ran on exactly one agent"
    assert sum(1 for rids in handled.values() if rids) >= 2, handled

    # each agent still answers its own topic, on its own response topic
    own = pool[0]
    client.subscribe(own.response_topic)
    client.publish(own.request_topic, json.dumps({"id": "direct", "prompt": "hi", "max_tokens": 4}))
    assert client.wait_for(lambda d: d.get("id") == "direct")["ok"]
    assert "direct" in done_ids(own)


def test_fleet_reply_rules_and_a_stopped_member(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    pool = [start_agent(broker, client, mqtt__shared_group="pool-b", limits__queue_size=30)
            for _ in range(2)]
    client.subscribe(FLEET_RESPONSE)
    client.subscribe("app/replies/#")
    client.publish(FLEET_REQUEST, json.dumps({"id": "r1", "prompt": "hi", "max_tokens": 4}),
                   response_topic="app/replies/1", correlation=b"c1")
    client.publish(FLEET_REQUEST, json.dumps({"id": "r2", "prompt": "hi", "reply_to": "app/replies/2",
                                              "max_tokens": 4}))
    client.publish(FLEET_REQUEST, json.dumps({"id": "bad", "prompt": "hi", "colour": "red"}))
    seen: dict[str, tuple[str, Any]] = {}
    while len(seen) < 3:
        topic, doc, props = client.next()
        if "id" in doc:
            seen[doc["id"]] = (topic, doc, props)
    assert seen["r1"][0] == "app/replies/1" and seen["r1"][2].CorrelationData == b"c1"
    assert seen["r2"][0] == "app/replies/2"
    assert seen["bad"][0] == FLEET_RESPONSE and seen["bad"][1]["error"]["code"] == "bad_request"

    # a member that stopped takes nothing more: the rest of the pool answers everything
    assert pool[0].stop(signal.SIGTERM) == 0
    ids = [f"after-{i}" for i in range(10)]
    for rid in ids:
        client.publish(FLEET_REQUEST, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4}))
    answers = collect(client, ids)
    assert all(a["ok"] for a in answers.values())
    assert set(ids) <= set(done_ids(pool[1]))


def test_fleet_is_a_reserved_device_id(tmp_path: Any) -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.settings.files import load_settings

    config = tmp_path / "agent.toml"
    config.write_text('device_id = "fleet"\n')
    with pytest.raises(ConfigError, match="reserved"):
        load_settings(config)


def test_ask_fleet_is_answered_by_one_member(broker: Broker, client: Client,
                                             start_agent: Callable[..., AgentProcess]) -> None:
    import subprocess
    import sys

    pool = [start_agent(broker, client, mqtt__shared_group="pool-ask") for _ in range(2)]
    result = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "hi", "--fleet", "--id", "ask-fleet",
                             "--port", str(broker.port), "--max-tokens", "4", "--json", "--timeout", "30"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] and answer["id"] == "ask-fleet"
    assert sorted(rid for agent in pool for rid in done_ids(agent)) == ["ask-fleet"]
    both = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "hi", "--fleet", "--device", "x",
                           "--port", str(broker.port)], capture_output=True, text=True, timeout=60)
    assert both.returncode == 64


def test_a_fleet_cancel_reaches_whichever_member_holds_the_request(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """Every member hears <prefix>/fleet/cancel; the one running the request ends it (a SLOW
    prompt holds it a second: a fault hook in the child), the others find nothing."""
    pool = [start_agent(broker, client, mqtt__shared_group="pool-c", env=fault_hooks_env(tmp_path / f"hooks{n}"))
            for n in range(2)]
    client.subscribe(FLEET_RESPONSE)
    client.publish(FLEET_REQUEST, json.dumps({"id": "stop-me", "prompt": "SLOW story", "max_tokens": 16}))
    time.sleep(0.3)
    client.publish("edge-agent/fleet/cancel", json.dumps({"id": "stop-me"}))
    doc = collect(client, ["stop-me"])["stop-me"]
    assert doc["ok"] and doc["finish_reason"] == "cancelled", doc
    found = [line["found"] for agent in pool for line in agent.log_lines() if line.get("event") == "request.cancel"]
    assert sorted(found) == [False, True]


def fleet_answers(client: Client, ids: list[str], timeout: float) -> dict[str, tuple[str, dict[str, Any], Any]]:
    """Each id's answer (topic, document, MQTT properties); a second answer for an id fails."""
    answers: dict[str, tuple[str, dict[str, Any], Any]] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < len(ids):
        try:
            topic, doc, props = client.next(max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"never answered: {sorted(set(ids) - set(answers))}")
        if doc.get("id") in ids and "ok" in doc:
            assert doc["id"] not in answers, f"{doc['id']} answered twice"
            answers[doc["id"]] = (topic, doc, props)
    return answers


def no_more_answers(client: Client, ids: list[str], seconds: float = 3.0) -> None:
    time.sleep(seconds)
    again = [doc["id"] for doc in client.drain() if doc.get("id") in ids and "ok" in doc]
    assert not again, f"answered again: {again}"


def events(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in agent.log_lines() if line.get("event") == name]


def slow_burst(client: Client, ids: list[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """A SLOW fleet request per id, published at once: each id's one answer, and the ids answered
    `busy` (some must be, and every error must be `busy` with a retry_after_ms)."""
    client.subscribe(FLEET_RESPONSE)
    for rid in ids:
        client.publish(FLEET_REQUEST, json.dumps({"id": rid, "prompt": "SLOW hi", "max_tokens": 4}))
    answers = {rid: doc for rid, (_, doc, _) in fleet_answers(client, ids, timeout=120).items()}
    no_more_answers(client, ids)
    busy = {rid for rid, doc in answers.items() if not doc["ok"]}
    assert busy and all(answers[rid]["error"]["code"] == "busy" and answers[rid]["error"]["retry_after_ms"] > 0
                        for rid in busy), answers
    return answers, busy


def test_a_full_member_hands_fleet_requests_back_to_the_pool(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """One member is saturated (one at a time, a queue of 1, and SLOW prompts take it a second
    more: a fault hook in that agent only); the other two have room for the whole burst. What
    the broker hands the full one goes back to the pool: nobody is told `busy`, every request
    is answered once, on its own Response Topic with its Correlation Data, and runs once."""
    group = {"mqtt__shared_group": "pool-h", "inference__max_batch": 1, "mqtt__fleet_max_hops": 10}
    full = start_agent(broker, client, limits__queue_size=1, stats_interval_s=0.5,
                       env=fault_hooks_env(tmp_path / "hooks"), **group)
    roomy = [start_agent(broker, client, limits__queue_size=30, **group) for _ in range(2)]
    client.subscribe("app/h/#")
    ids = [f"h{i}" for i in range(30)]
    for rid in ids:
        client.publish(FLEET_REQUEST, json.dumps({"id": rid, "prompt": "SLOW hi", "max_tokens": 4}),
                       response_topic=f"app/h/{rid}", correlation=rid.encode(), expiry_s=300)
    answers = fleet_answers(client, ids, timeout=120)
    not_ok = {rid: doc for rid, (_, doc, _) in answers.items() if not doc["ok"]}
    assert not not_ok, not_ok  # no `busy` while another member had room
    for rid, (topic, _, props) in answers.items():
        assert topic == f"app/h/{rid}" and props.CorrelationData == rid.encode()
    no_more_answers(client, ids)

    ran = {agent.device_id: done_ids(agent) for agent in (full, *roomy)}
    assert sorted(rid for rids in ran.values() for rid in rids) == sorted(ids), "each ran on exactly one agent"
    handed = events(full, "request.handed_back")
    assert handed, "the full member passed nothing on"
    assert all(line["hops"] >= 1 and 0 < line["expiry_s"] <= 300 for line in handed)
    assert {line["request_id"] for line in handed} - set(ran[full.device_id]), "handed back, answered elsewhere"
    assert not any(events(agent, "request.handed_back") for agent in roomy)
    stats = next_stats(broker.port, full)
    assert stats["fleet"]["handed_back"] == len(handed) and "busy" not in stats["requests"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_at_the_hop_limit_a_full_member_answers_busy(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path,
        protocol: str) -> None:
    """A pool of one, kept full by SLOW prompts: what it hands back comes back to it (its own
    de-duplication entry must not hold the request), twice, and then it answers `busy`.
    MQTT 3.1.1 has no property to count hops in: such a member answers `busy` at once."""
    agent = start_agent(broker, client, mqtt__shared_group=f"pool-i{protocol.replace('.', '')}",
                        mqtt__protocol=protocol, mqtt__fleet_max_hops=2, inference__max_batch=1,
                        limits__queue_size=1, env=fault_hooks_env(tmp_path / "hooks"))
    ids = [f"i{protocol}-{n}" for n in range(8)]
    answers, busy = slow_burst(client, ids)
    assert sorted(done_ids(agent)) == sorted(set(ids) - busy), "each ran once, or was answered busy"
    hops: dict[str, list[int]] = {}
    for line in events(agent, "request.handed_back"):
        hops.setdefault(line["request_id"], []).append(line["hops"])
    if protocol == "3.1.1":
        assert not hops
        return
    for rid in busy:
        assert hops[rid] == [1, 2], (rid, hops)
        assert "passed on 2 times in the fleet" in answers[rid]["error"]["message"]
    assert {line["request_id"] for line in events(agent, "request.hop_limit")} == busy


def test_a_hand_back_the_broker_refuses_is_answered_here(
        start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A member allowed to read the fleet topic but not to publish on it (an ACL from before
    hand-backs): the broker refuses the copy (MQTT 5 PUBACK "Not authorized"), and the member
    answers the request itself (`busy` here) instead of acknowledging it into nowhere."""
    users = {"box-r": "pw-r-41c2", "app-r": "pw-a-9e07"}
    acl = ("user box-r\ntopic read edge-agent/fleet/request\ntopic read edge-agent/fleet/cancel\n"
           "topic write edge-agent/fleet/response\ntopic readwrite edge-agent/box-r/#\n"
           "user app-r\ntopic write edge-agent/fleet/request\ntopic read edge-agent/fleet/response\n"
           "topic read edge-agent/+/status\n")
    broker = Broker(users=users, acl=acl)
    broker.start()
    pipeline = Client(broker.port, user=("app-r", users["app-r"]))
    try:
        (tmp_path / "pw").write_text(users["box-r"] + "\n")
        agent = start_agent(broker, pipeline, device_id="box-r", mqtt__username="box-r",
                            mqtt__password_file=str(tmp_path / "pw"), mqtt__shared_group="pool-r",
                            inference__max_batch=1, limits__queue_size=1, env=fault_hooks_env(tmp_path / "hooks"))
        ids = [f"r{n}" for n in range(5)]
        _, busy = slow_burst(pipeline, ids)
        assert sorted(done_ids(agent)) == sorted(set(ids) - busy)
        assert {line["request_id"] for line in events(agent, "request.hand_back_refused")} == busy
        assert all("authorized" in line["reason"] for line in events(agent, "mqtt.publish_refused"))
    finally:
        pipeline.close()
        broker.close()
