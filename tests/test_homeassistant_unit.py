"""Home Assistant discovery payloads, pure: shape, ids, limits, removal, rule entities.
What HA itself makes of them is tests/test_homeassistant_real.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edge_agent.automation.homeassistant import (MAX_STATE_CHARS, RuleEntity, components, discovery_payload,
                                      discovery_topic, removal_payload, rule_entity)
from edge_agent.protocol import Topics

TOPICS = Topics("edge-agent", "box1")
RULES = [RuleEntity("door_open", boolean_key="open"), RuleEntity("people", value_key="count"),
         RuleEntity("scene")]
# What each platform cannot do without (HA's MQTT_RO_SCHEMA / MQTT_RW_SCHEMA).
REQUIRED = {"binary_sensor": {"stat_t"}, "sensor": {"stat_t"}, "text": {"cmd_t"}}


def payload(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(device_id="box1", version="0.1.0", model="phi-3.5-mini",
                                cameras_with_motion=["front", "back.yard"], rules=RULES)
    args.update(overrides)
    return discovery_payload(TOPICS, **args)


def schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": properties}}}


def test_discovery_topic_is_the_device_topic_with_safe_characters() -> None:
    assert discovery_topic("homeassistant", "box1") == "homeassistant/device/box1/config"
    # HA's discovery topic allows [a-zA-Z0-9_-] only; our device ids may hold dots.
    assert discovery_topic("ha", "shed.cam-1") == "ha/device/shed_cam-1/config"


def test_device_origin_availability_and_qos() -> None:
    doc = payload()
    assert doc["dev"] == {"ids": ["edge_agent_box1"], "name": "edge-agent box1", "mdl": "phi-3.5-mini",
                          "sw": "0.1.0", "mf": "edge-agent"}
    assert doc["o"] == {"name": "edge-agent", "sw": "0.1.0"}
    assert payload(origin_url="https://example.org/x")["o"]["url"] == "https://example.org/x"
    [availability] = doc["avty"]
    assert availability["t"] == TOPICS.status
    template = availability["val_tpl"]
    assert "'offline' if value_json.state == 'offline' else 'online'" in template
    assert doc["qos"] == 1 and all(c["qos"] == 1 for c in doc["cmps"].values())
    json.dumps(doc)  # goes on the wire as is


def test_every_component_has_platform_ids_and_required_topics() -> None:
    cmps = payload()["cmps"]
    assert set(cmps) == {"status", "tokens_per_s", "queue_depth", "motion_front", "motion_back_yard",
                         "watch_door_open_binary_sensor", "watch_people_sensor", "watch_scene_sensor",
                         "prompt", "answer"}
    for cid, config in cmps.items():
        oid = cid.removesuffix(f"_{config['p']}") if cid.startswith("watch_") else cid
        assert config["uniq_id"] == config["obj_id"] == f"edge_agent_box1_{oid}"
        assert config["name"] and " " not in cid
        assert REQUIRED[config["p"]] <= set(config), cid
    assert len({c["uniq_id"] for c in cmps.values()}) == len(cmps)
    assert cmps["motion_back_yard"]["name"] == "back.yard motion"
    assert cmps["watch_door_open_binary_sensor"]["name"] == "door open"


def test_ids_are_stable_across_calls_and_orders() -> None:
    first = payload()
    again = payload(cameras_with_motion=["back.yard", "front"], rules=list(reversed(RULES)))
    assert {cid: c["uniq_id"] for cid, c in first["cmps"].items()} == \
           {cid: c["uniq_id"] for cid, c in again["cmps"].items()}


def test_components_read_the_topics_the_agent_writes() -> None:
    cmps = payload()["cmps"]
    assert cmps["status"]["stat_t"] == TOPICS.status
    assert cmps["status"]["dev_cla"] == "connectivity" and cmps["status"]["ent_cat"] == "diagnostic"
    assert "value_json.state == 'ready'" in cmps["status"]["val_tpl"]
    for cid in ("tokens_per_s", "queue_depth"):
        assert cmps[cid]["stat_t"] == TOPICS.stats and cmps[cid]["ent_cat"] == "diagnostic"
        assert cmps[cid]["stat_cla"] == "measurement" and f"value_json.{cid}" in cmps[cid]["val_tpl"]
    assert cmps["tokens_per_s"]["unit_of_meas"] == "tokens/s"
    assert cmps["motion_back_yard"]["stat_t"] == TOPICS.motion("back.yard")
    assert cmps["motion_front"]["dev_cla"] == "motion"
    for rule in RULES:
        config = cmps[f"watch_{rule.name}_{'binary_sensor' if rule.boolean_key else 'sensor'}"]
        assert config["stat_t"] == config["json_attr_t"] == TOPICS.watch(rule.name)
        assert "to_json" in config["json_attr_tpl"]
    assert cmps["prompt"]["cmd_t"] == TOPICS.ha_prompt and "stat_t" not in cmps["prompt"]
    assert cmps["answer"]["stat_t"] == cmps["answer"]["json_attr_t"] == TOPICS.ha_answer


def test_states_stay_within_home_assistants_limit() -> None:
    cmps = payload()["cmps"]
    assert cmps["prompt"]["p"] == "text" and cmps["prompt"]["max"] <= MAX_STATE_CHARS == 255
    # Free text is cut in the template; the whole of it is in the attributes.
    for cid in ("watch_people_sensor", "watch_scene_sensor", "answer"):
        assert "[:255]" in cmps[cid]["val_tpl"], cid
    assert "error" in cmps["answer"]["val_tpl"] and "message" in cmps["answer"]["val_tpl"]


def test_rule_templates_read_their_key() -> None:
    cmps = payload()["cmps"]
    binary = cmps["watch_door_open_binary_sensor"]
    assert binary["p"] == "binary_sensor"
    assert "j.get(\"open\")" in binary["val_tpl"] and "is boolean" in binary["val_tpl"]
    assert "'None'" in binary["val_tpl"]  # HA's word for unknown: no JSON, or not a boolean
    value = cmps["watch_people_sensor"]
    assert value["p"] == "sensor" and "j.get(\"count\")" in value["val_tpl"]
    assert "value_json.text" in cmps["watch_scene_sensor"]["val_tpl"]


def test_a_key_with_quotes_becomes_a_safe_jinja_literal() -> None:
    cmps = payload(rules=[RuleEntity("odd", value_key='say "hi" \\ ü')])["cmps"]
    assert 'j.get("say \\"hi\\" \\\\ ü")' in cmps["watch_odd_sensor"]["val_tpl"]


def test_previous_components_that_are_gone_are_sent_with_their_platform_only() -> None:
    first = payload()
    previous = components(first)
    assert previous["watch_door_open_binary_sensor"] == "binary_sensor" and previous["prompt"] == "text"
    second = payload(rules=RULES[1:], cameras_with_motion=["front"], previous=previous)
    assert second["cmps"]["watch_door_open_binary_sensor"] == {"p": "binary_sensor"}
    assert second["cmps"]["motion_back_yard"] == {"p": "binary_sensor"}
    assert second["cmps"]["watch_people_sensor"] == first["cmps"]["watch_people_sensor"]  # untouched
    assert set(components(second)) == set(previous) - {"watch_door_open_binary_sensor", "motion_back_yard"}
    # Announced again from those: nothing more to remove.
    third = payload(rules=RULES[1:], cameras_with_motion=["front"], previous=components(second))
    assert all(len(c) > 1 for c in third["cmps"].values())


def test_a_rule_changing_platform_removes_its_old_entity() -> None:
    """HA knows a component by (platform, id): a rule turning from binary_sensor to sensor is a
    new component, and the old one must be removed by name."""
    previous = components(payload())
    doc = payload(rules=[RuleEntity("door_open", value_key="open")], previous=previous)
    assert doc["cmps"]["watch_door_open_binary_sensor"] == {"p": "binary_sensor"}
    assert doc["cmps"]["watch_door_open_sensor"]["uniq_id"] == "edge_agent_box1_watch_door_open"


def test_removal_payload_is_empty() -> None:
    assert removal_payload() == b""


@pytest.mark.parametrize("change_key, response_format, expected", [
    (("open",), schema({"open": {"type": "boolean"}}), RuleEntity("r", boolean_key="open")),
    (("open",), schema({"open": {"type": ["boolean", "null"]}}), RuleEntity("r", boolean_key="open")),
    (("count",), schema({"count": {"type": "integer"}}), RuleEntity("r", value_key="count")),
    (("label",), schema({"open": {"type": "boolean"}}), RuleEntity("r", value_key="label")),
    (("open",), {"type": "json_object"}, RuleEntity("r", value_key="open")),
    (("open", "count"), schema({"open": {"type": "boolean"}}), RuleEntity("r")),
    ((), schema({"open": {"type": "boolean"}}), RuleEntity("r")),
    ((), None, RuleEntity("r")),
    (("open",), {"type": "json_schema", "json_schema": {"name": "x"}}, RuleEntity("r", value_key="open")),
])
def test_rule_entity_choice(change_key: tuple[str, ...], response_format: dict[str, Any] | None,
                            expected: RuleEntity) -> None:
    assert rule_entity("r", change_key, response_format) == expected
