"""Home Assistant discovery and the prompt entity, from the outside: a real mosquitto, the agent
as a process, a client standing in for Home Assistant (tests/test_homeassistant_real.py checks
the same payload shapes against a real Home Assistant)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from support import DOOR_SCHEMA, AgentProcess, Broker, Client, collect, file_camera as camera, first
from video import make_still_clip


@pytest.fixture(scope="module")
def still(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_still_clip(tmp_path_factory.mktemp("ha") / "still.avi", seconds=2, size="320x240")


RULES = {"door": {"camera": "yard", "prompt": "Is the door open?", "every_s": 60, "max_tokens": 12,
                  "response_format": DOOR_SCHEMA, "change_key": "open"},
         "scene": {"camera": "yard", "prompt": "Describe the yard.", "every_s": 60, "max_tokens": 6}}


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, vision_model: Path,
          still: Path) -> AgentProcess:
    return start_agent(broker, client, model=vision_model, reload_debounce_s=0.2, images__longest_side=336,
                       homeassistant={"enabled": True}, cameras={"yard": camera(still, motion=True)},
                       watch=RULES)


def discovery(client: Client, agent: AgentProcess) -> dict[str, Any]:
    return json.loads(first(client, f"homeassistant/device/{agent.device_id}/config", 30)[1])


def test_discovery_is_retained_complete_and_refreshed_on_birth(broker: Broker, agent: AgentProcess) -> None:
    ha = Client(broker.port)  # Home Assistant, connecting after the agent: it gets the retained copy
    try:
        ha.subscribe("homeassistant/#")
        doc = discovery(ha, agent)
        assert doc["dev"]["ids"] and doc["o"]["name"] == "edge-agent"
        assert doc["avty"][0]["t"] == agent.status_topic  # the last will makes it unavailable
        cmps = doc["cmps"]
        assert all("p" in c and "uniq_id" in c for c in cmps.values())
        assert all("stat_t" in c for c in cmps.values() if c["p"] in ("sensor", "binary_sensor"))
        base = f"{agent.prefix}/{agent.device_id}"
        by_topic = {c.get("stat_t") or c.get("cmd_t") or c.get("img_t"): c for c in cmps.values()}
        assert by_topic[f"{base}/camera/yard/motion"]["p"] == "binary_sensor"
        assert by_topic[f"{base}/watch/door"]["p"] == "binary_sensor"  # a boolean change_key
        assert by_topic[f"{base}/watch/scene"]["p"] == "sensor"
        assert by_topic[f"{base}/ha/prompt"]["p"] == "text"
        assert by_topic[f"{base}/status"]["dev_cla"] == "connectivity"
        assert by_topic[f"{base}/watch/scene/snapshot"]["p"] == "image"  # what the model saw
        # connectivity, tokens/s, queue depth, motion, 2 rules and their 2 snapshots, prompt, answer
        assert len(cmps) == 10
        collect(ha, 1.0)  # the agent announces on connect and once ready: let both pass
        ha.publish("homeassistant/status", "online")  # HA's birth: it may have lost its state
        assert discovery(ha, agent) == doc
        ha.publish("homeassistant/status", "offline")
        assert not [t for _, t, _ in collect(ha, 1.0) if t.endswith("/config")]
    finally:
        ha.close()


def test_a_removed_rule_removes_its_component_and_disabling_removes_the_device(
        broker: Broker, agent: AgentProcess) -> None:
    ha = Client(broker.port)
    try:
        ha.subscribe("homeassistant/#")
        before = discovery(ha, agent)
        collect(ha, 1.0)  # the agent announces on connect and once ready: let both pass
        agent.rewrite(watch={"door": RULES["door"]})
        after = discovery(ha, agent)
        removed = {cid for cid in before["cmps"] if after["cmps"][cid] == {"p": before["cmps"][cid]["p"]}}
        assert removed == {cid for cid, c in before["cmps"].items()
                           if c.get("stat_t", "").endswith("/watch/scene") or c.get("img_t", "").endswith("/watch/scene/snapshot")}
        assert len(removed) == 2  # the rule's sensor and its snapshot image
        assert len(after["cmps"]) == len(before["cmps"])
        agent.rewrite(homeassistant={"enabled": False})
        topic, payload = None, None
        for _, topic, payload in collect(ha, 8):
            if topic.endswith("/config"):
                break
        assert topic == f"homeassistant/device/{agent.device_id}/config" and payload == b""
    finally:
        ha.close()


def test_a_prompt_from_the_text_entity_is_answered_on_the_sensor(broker: Broker, agent: AgentProcess) -> None:
    ha = Client(broker.port)
    answer_topic = f"{agent.prefix}/{agent.device_id}/ha/answer"
    try:
        ha.subscribe(answer_topic)
        ha.publish(f"{agent.prefix}/{agent.device_id}/ha/prompt", "Say hello")
        answer = json.loads(first(ha, answer_topic, 30)[1])
        assert answer["ok"] and isinstance(answer["text"], str)
        ha.publish(f"{agent.prefix}/{agent.device_id}/ha/prompt", b"\xff\xfe")
        refused = json.loads(first(ha, answer_topic, 30)[1])
        assert refused["error"] == {"code": "bad_request", "message": "the prompt is not UTF-8 text"}
        late = Client(broker.port)  # the sensor's value is retained: HA after a restart sees it
        try:
            late.subscribe(answer_topic)
            assert json.loads(first(late, answer_topic, 10)[1]) == refused
        finally:
            late.close()
        ha.publish(f"{agent.prefix}/{agent.device_id}/ha/prompt", "x" * 1025)
        too_long = json.loads(first(ha, answer_topic, 30)[1])
        assert too_long["error"] == {"code": "bad_request", "message": "the prompt is 1025 bytes; the limit is 1024"}
        ha.publish(f"{agent.prefix}/{agent.device_id}/ha/prompt", "Say hello again")
        assert json.loads(first(ha, answer_topic, 30)[1])["ok"]  # bad input cost nothing
    finally:
        ha.close()
