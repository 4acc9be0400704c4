"""Our discovery payloads against a real Home Assistant 2025.1.4 (tests/homeassistant.py) on a
private mosquitto: HA takes every component, shows the states the agent publishes, sends the
prompt typed into its text entity, and removes what we say is gone.

HA is started once for the module (≈8 s; its venv is built once per machine, ≈2.5 min). What it
logs, found by trying: "Found new component: <platform> <node> <id>" for each component it
parses, then "Registered new <platform>.mqtt entity: <entity_id>" only for those its platform
schema accepts (else "Error '…' when processing MQTT discovery message"); "Removing component:
<entity_id>" for each removed one; a refused device part logs "Invalid MQTT device discovery
payload"; keys it does not know are dropped without a word (hence `validate`).
"""

from __future__ import annotations

import json
import queue
import re
import time
from typing import Any, Iterator

import pytest

from edge_agent.automation.homeassistant import (RuleEntity, components, discovery_payload, discovery_topic,
                                      removal_payload)
from edge_agent.protocol import Topics
from homeassistant import HomeAssistant, ensure_venv, validate
from support import Broker, Client

pytestmark = pytest.mark.slow

RULES = [RuleEntity("door_open", boolean_key="open"), RuleEntity("people", value_key="count"),
         RuleEntity("scene")]
CAMERAS = ["front", "back.yard"]
PROMPT_TRIGGER = "test/set_prompt"
# The only way into HA's text entity offline (no API token): an automation that sets it from
# an MQTT message, as a user typing would.
AUTOMATION = """
automation:
  - alias: set prompt
    triggers:
      - trigger: mqtt
        topic: test/set_prompt
    actions:
      - action: text.set_value
        target:
          entity_id: text.edge_agent_box1_prompt
        data:
          value: "{{ trigger.payload }}"
"""
ERRORS = r"when processing MQTT discovery message|Invalid MQTT device discovery payload|Unable to parse JSON"


def announcement(device: str, rules: list[RuleEntity] = RULES, previous: dict[str, str] | None = None,
                 ) -> dict[str, Any]:
    return discovery_payload(Topics("edge-agent", device), device_id=device, version="0.1.0",
                             model="smollm2-135m", cameras_with_motion=CAMERAS, rules=rules,
                             previous=previous or {})


def entity_id(config: dict[str, Any]) -> str:
    return f"{config['p']}.{config['obj_id']}"


def live(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {cid: config for cid, config in payload["cmps"].items() if len(config) > 1}


class Announcer:
    """Publishes retained as the agent does, and reads the agent's topics."""

    def __init__(self, port: int) -> None:
        self.client = Client(port)
        self.client.subscribe("edge-agent/#")

    def publish(self, topic: str, payload: Any, retain: bool = True) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def announce(self, ha: HomeAssistant, device: str, payload: dict[str, Any],
                 new: set[str] | None = None) -> int:
        """Publish the discovery document; wait until HA registered the entities of the
        components `new` (default: all live ones). Returns the log mark from before."""
        since = ha.mark()
        self.publish(discovery_topic("homeassistant", device), payload)
        ha.wait_for(re.escape(f"Processing device discovery for '{device}'"), since=since)
        for cid, config in live(payload).items():
            if new is None or cid in new:
                ha.wait_for(re.escape(f"Registered new {config['p']}.mqtt entity: {entity_id(config)}") + "$",
                            since=since)
        return since

    def raw(self, topic: str, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, payload, _ = self.client.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"nothing on {topic}") from None
            if got == topic:
                return payload


@pytest.fixture(scope="module")
def hass_exe(request: pytest.FixtureRequest) -> Any:
    try:
        hass, built_s = ensure_venv()
    except RuntimeError as exc:
        if "no Python 3.12" in str(exc):
            pytest.skip(str(exc))
        raise
    if built_s:
        _report(request, f"homeassistant: venv built in {built_s:.0f} s")
    return hass


@pytest.fixture(scope="module")
def ha(hass_exe: Any, module_broker: Broker, request: pytest.FixtureRequest) -> Iterator[HomeAssistant]:
    server = HomeAssistant(hass_exe, module_broker.port, extra_config=AUTOMATION)
    try:
        _report(request, f"homeassistant: started in {server.start():.1f} s")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def agent(module_broker: Broker) -> Iterator[Announcer]:
    announcer = Announcer(module_broker.port)
    yield announcer
    announcer.client.close()


@pytest.fixture(scope="module")
def box1(ha: HomeAssistant, agent: Announcer) -> tuple[dict[str, Any], int]:
    """box1 announced: (its payload, the log mark from before)."""
    payload = announcement("box1")
    return payload, agent.announce(ha, "box1", payload)


def _report(request: pytest.FixtureRequest, line: str) -> None:
    """Timings on the terminal, past pytest's capture (they are what this harness costs)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{line}")


def test_home_assistant_takes_every_component(ha: HomeAssistant, box1: tuple[dict[str, Any], int]) -> None:
    payload, since = box1
    for cid, config in payload["cmps"].items():
        ha.wait_for(re.escape(f"Found new component: {config['p']} box1 {cid}") + "( |$)", since=since)
    assert len(live(payload)) == 3 + len(CAMERAS) + len(RULES) + 2
    assert ha.lines(ERRORS, since) == []


def test_every_key_is_one_home_assistants_schemas_know(hass_exe: Any) -> None:
    first = announcement("box9")
    payload = announcement("box9", rules=RULES[:1], previous=components(first))
    results = validate(hass_exe, payload)
    assert {cid for cid, result in results.items() if result == "removed"} == \
           {"watch_people_sensor", "watch_scene_sensor"}
    assert {cid: result for cid, result in results.items() if result not in ("ok", "removed")} == {}
    # The check has teeth: a misspelt key is what HA's discovery would have dropped silently.
    payload["cmps"]["status"]["stat_topic"] = payload["cmps"]["status"].pop("stat_t")
    assert "extra keys not allowed @ data['stat_topic']" in validate(hass_exe, payload)["status"]


def test_states_the_agent_publishes_show_in_home_assistant(
        ha: HomeAssistant, box1: tuple[dict[str, Any], int], agent: Announcer) -> None:
    topics, long_text = Topics("edge-agent", "box1"), "A long description of the yard. " * 20
    cases = [
        (topics.status, {"state": "ready", "device_id": "box1"}, "binary_sensor.edge_agent_box1_status", "on"),
        (topics.stats, {"tokens_per_s": 61.25, "queue_depth": 2}, "sensor.edge_agent_box1_tokens_per_s", "61.25"),
        (topics.stats, {"tokens_per_s": None, "queue_depth": 3}, "sensor.edge_agent_box1_queue_depth", "3"),
        (topics.motion("front"), "ON", "binary_sensor.edge_agent_box1_motion_front", "on"),
        (topics.motion("back.yard"), "OFF", "binary_sensor.edge_agent_box1_motion_back_yard", "off"),
        (topics.watch("door_open"), {"rule": "door_open", "text": '{"open":true}', "json": {"open": True}},
         "binary_sensor.edge_agent_box1_watch_door_open", "on"),
        (topics.watch("door_open"), {"rule": "door_open", "text": '{"open":false}', "json": {"open": False}},
         "binary_sensor.edge_agent_box1_watch_door_open", "off"),
        (topics.watch("door_open"), {"rule": "door_open", "text": "cut off"},
         "binary_sensor.edge_agent_box1_watch_door_open", "unknown"),
        (topics.watch("people"), {"rule": "people", "text": '{"count":3}', "json": {"count": 3}},
         "sensor.edge_agent_box1_watch_people", "3"),
        (topics.watch("people"), {"rule": "people", "text": "{}", "json": {}},
         "sensor.edge_agent_box1_watch_people", "unknown"),
        (topics.watch("scene"), {"rule": "scene", "text": long_text}, "sensor.edge_agent_box1_watch_scene",
         long_text[:255]),
        (topics.ha_answer, {"id": "a1", "ok": True, "text": "Paris"}, "sensor.edge_agent_box1_answer", "Paris"),
        (topics.ha_answer, {"id": "a2", "ok": False, "error": {"code": "busy", "message": "try again"}},
         "sensor.edge_agent_box1_answer", "try again"),
        (topics.status, {"state": "degraded"}, "binary_sensor.edge_agent_box1_status", "off"),
        # The last will: the whole device goes unavailable.
        (topics.status, {"state": "offline"}, "sensor.edge_agent_box1_answer", "unavailable"),
    ]
    for topic, message, entity, state in cases:
        since = ha.mark()
        agent.publish(topic, message)
        line = ha.wait_state(entity, state, since=since)
        assert ha.lines(" (WARNING|ERROR) ", since) == [], line  # template warnings included
    # The long text is whole in the attributes.
    assert f"text={long_text.strip()}" in ha.log()


def test_the_text_entity_sends_the_prompt_to_the_agent(
        ha: HomeAssistant, box1: tuple[dict[str, Any], int], agent: Announcer) -> None:
    topics = Topics("edge-agent", "box1")
    # Unavailable, then available: the state changes to unknown whatever it was before.
    since = ha.mark()
    agent.publish(topics.status, {"state": "offline"})
    agent.publish(topics.status, {"state": "ready"})
    ha.wait_state("text.edge_agent_box1_prompt", "unknown", since=since)
    agent.publish(PROMPT_TRIGGER, "What is the capital of France?", retain=False)
    assert agent.raw(topics.ha_prompt) == b"What is the capital of France?"


def test_a_removed_rule_and_a_changed_platform_are_removed(ha: HomeAssistant, agent: Announcer) -> None:
    first = announcement("box2")
    agent.announce(ha, "box2", first)
    # door_open is now a plain value (sensor); scene is gone.
    rules = [RuleEntity("door_open", value_key="open"), RuleEntity("people", value_key="count")]
    second = announcement("box2", rules=rules, previous=components(first))
    since = agent.announce(ha, "box2", second, new={"watch_door_open_sensor"})
    for gone in ("binary_sensor.edge_agent_box2_watch_door_open", "sensor.edge_agent_box2_watch_scene"):
        ha.wait_for(re.escape(f"Removing component: {gone}") + "$", since=since)
        ha.wait_for(re.escape(f"entity_registry_updated[L]: action=remove, entity_id={gone}>"), since=since)
    ha.wait_for(re.escape("Registered new sensor.mqtt entity: sensor.edge_agent_box2_watch_door_open"),
                since=since)
    assert len(ha.lines("Removing component: .*edge_agent_box2_", since)) == 2
    assert ha.lines(ERRORS, since) == []
    # Announced again from what is live now: nothing more goes, nothing changes.
    third = announcement("box2", rules=rules, previous=components(second))
    since = agent.announce(ha, "box2", third, new=set())
    for config in live(third).values():
        ha.wait_for(re.escape(f"Ignoring unchanged update for: {entity_id(config)}") + "$", since=since)
    assert ha.lines("Removing component", since) == []


def test_the_empty_payload_removes_the_device(ha: HomeAssistant, agent: Announcer) -> None:
    payload = announcement("box3")
    agent.announce(ha, "box3", payload)
    since = ha.mark()
    agent.publish(discovery_topic("homeassistant", "box3"), removal_payload())
    for config in live(payload).values():
        ha.wait_for(re.escape(f"Removing component: {entity_id(config)}") + "$", since=since)
    ha.wait_for(re.escape("device_registry_updated[L]: action=remove"), since=since)
    assert len(ha.lines("Removing component: ", since)) == len(live(payload))


def test_home_assistants_refusals_show_in_its_log(ha: HomeAssistant, agent: Announcer) -> None:
    """What the tests above look for when they assert no error."""
    payload = announcement("box4")
    del payload["cmps"]["queue_depth"]["stat_t"]
    since = ha.mark()
    agent.publish(discovery_topic("homeassistant", "box4"), payload)
    ha.wait_for(r"Error 'required key not provided @ data\['state_topic'\]' when processing MQTT "
                r"discovery message topic: 'homeassistant/device/box4/config'", since=since)
    del payload["cmps"]["status"]["uniq_id"]
    agent.publish(discovery_topic("homeassistant", "box5"), payload)
    ha.wait_for(r"Invalid MQTT device discovery payload for box5, required key not provided "
                r"@ data\['components'\]\['status'\]\['unique_id'\]", since=since)
