"""Both real ends: the agent as a process (tiny vision model, a still file camera with motion
detection and a zone, two watch rules with their snapshots) and a real Home Assistant 2025.1.4 (tests/homeassistant.py), on the
session's mosquitto. HA registers what the agent announces, shows its states, sends the prompt
typed into its text entity, removes a rule dropped from the settings file, gets the device again
from the agent after its own restart, and marks everything unavailable when the agent dies.

The tests run in file order on one agent and one HA: each step starts from where the one before
left off (the kill comes last). HA's log is what they read (see test_homeassistant_real.py).
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any, Iterator

import pytest

from homeassistant import DISCOVERY_ERRORS, PROMPT_AUTOMATION, HomeAssistant, hass_or_skip
from support import DOOR_SCHEMA, AgentProcess, Broker, Client, build_model, file_camera, first
from video import make_still_clip

pytestmark = pytest.mark.slow

DEVICE = "hae2e"
NODE = f"edge_agent_{DEVICE}"
RULES = {"door": {"camera": "yard", "prompt": "Is the door open?", "every_s": 60, "max_tokens": 12,
                  "response_format": DOOR_SCHEMA, "change_key": "open"},
         "scene": {"camera": "yard", "prompt": "Describe the yard.", "every_s": 60, "max_tokens": 6}}
DOOR, SCENE = f"binary_sensor.{NODE}_watch_door", f"sensor.{NODE}_watch_scene"
PROMPT, ANSWER = f"text.{NODE}_prompt", f"sensor.{NODE}_answer"
ZONE = f"binary_sensor.{NODE}_motion_yard_zone_gate"
DOOR_IMAGE, SCENE_IMAGE = f"image.{NODE}_watch_door_snapshot", f"image.{NODE}_watch_scene_snapshot"
ENTITIES = [f"binary_sensor.{NODE}_status", f"sensor.{NODE}_tokens_per_s", f"sensor.{NODE}_queue_depth",
            f"binary_sensor.{NODE}_motion_yard", ZONE, DOOR, DOOR_IMAGE, SCENE, SCENE_IMAGE, PROMPT, ANSWER]
GONE = (SCENE, SCENE_IMAGE)  # the rule the fourth test removes
PROMPT_TOPIC = "test/set_prompt"


@pytest.fixture(scope="module")
def ha(broker: Broker) -> Iterator[HomeAssistant]:
    automation = PROMPT_AUTOMATION.format(topic=PROMPT_TOPIC, entity_id=PROMPT)
    server = HomeAssistant(hass_or_skip(), broker.port, extra_config=automation)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def started(ha: HomeAssistant, broker: Broker,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, int]]:
    """The agent, started once HA is up: (the agent, HA's log mark from before its start)."""
    folder = tmp_path_factory.mktemp("ha-agent")
    still = make_still_clip(folder / "still.avi", seconds=2, size="320x240")
    agent = AgentProcess(folder, broker.port, build_model("tiny-vision"), device_id=DEVICE,
                         reload_debounce_s=0.2, images__longest_side=336, mqtt__keepalive=5,
                         homeassistant={"enabled": True},
                         cameras={"yard": {**file_camera(still, motion=True),
                                           "zones": {"gate": {"polygon": [[0, 0], [0.5, 0], [0.5, 0.5]]}}}},
                         watch=RULES)
    since, watcher = ha.mark(), Client(broker.port)
    try:
        agent.start(watcher)
        yield agent, since
    finally:
        watcher.close()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


def retained(broker: Broker, topic: str) -> dict[str, Any]:
    reader = Client(broker.port)
    try:
        reader.subscribe(topic)
        return json.loads(first(reader, topic, 30)[1])
    finally:
        reader.close()


def registered(ha: HomeAssistant, entity: str, since: int) -> None:
    platform = entity.split(".")[0]
    ha.wait_for(re.escape(f"Registered new {platform}.mqtt entity: {entity}") + "$", since=since)


def shown(ha: HomeAssistant, entity: str, state: str, since: int) -> None:
    """HA took exactly `state` for `entity` after `since` (model text: any characters, newlines too)."""
    ha.wait_for(re.escape(f"new_state=<state {entity}={state}".splitlines()[0]), since=since)
    assert re.search(re.escape(f"new_state=<state {entity}={state}") + "(; | @ )", ha.log()[since:]), state


def test_home_assistant_registers_every_component_the_agent_announces(
        ha: HomeAssistant, started: tuple[AgentProcess, int]) -> None:
    _, since = started
    for entity in ENTITIES:
        registered(ha, entity, since)
    assert len(ha.lines(f"Registered new .* entity: .*{NODE}_", since)) == len(ENTITIES)
    assert ha.lines(DISCOVERY_ERRORS, since) == []


def test_the_agents_states_show_in_home_assistant(
        ha: HomeAssistant, broker: Broker, started: tuple[AgentProcess, int]) -> None:
    agent, since = started
    ha.wait_state(f"binary_sensor.{NODE}_status", "on", since=since)
    ha.wait_state(f"binary_sensor.{NODE}_motion_yard", "off", since=since)
    door = retained(broker, f"{agent.prefix}/{DEVICE}/watch/door")
    line = ha.wait_for(rf"new_state=<state {re.escape(DOOR)}=(on|off)[;@ ]", since=since)[0]
    assert f"{DOOR}={'on' if door['json']['open'] else 'off'}" in line, (door, line)
    scene = retained(broker, f"{agent.prefix}/{DEVICE}/watch/scene")
    # HA strips what a value template renders.
    shown(ha, SCENE, scene["text"][:255].strip(), since)


def test_the_zone_sensor_and_the_rules_image_entity_serve_what_the_agent_published(
        ha: HomeAssistant, broker: Broker, started: tuple[AgentProcess, int]) -> None:
    agent, since = started
    ha.wait_state(ZONE, "off", since=since)
    reader = Client(broker.port)
    try:
        topic = f"{agent.prefix}/{DEVICE}/watch/door/snapshot"
        reader.subscribe(topic)
        jpeg = first(reader, topic, 30)[1]
    finally:
        reader.close()
    assert jpeg[:3] == b"\xff\xd8\xff"
    # The image entity's state is the time it got a picture; its entity_picture carries the token
    # HA's image proxy wants (no login needed).
    line = ha.wait_for(rf"state_changed\[L\]: entity_id={re.escape(DOOR_IMAGE)}, .*new_state=<state "
                       rf"{re.escape(DOOR_IMAGE)}=(?!unavailable|unknown)", since=since)[0]
    picture = re.search(r"entity_picture=(/api/image_proxy/[^,;> ]+)", line)
    assert picture, line
    with urllib.request.urlopen(f"http://127.0.0.1:{ha.http_port}{picture[1]}", timeout=10) as reply:
        assert reply.headers["Content-Type"] == "image/jpeg"
        assert reply.read() == jpeg


def test_a_prompt_typed_into_home_assistant_is_answered_on_its_sensor(
        ha: HomeAssistant, broker: Broker, started: tuple[AgentProcess, int]) -> None:
    agent, since = started
    ha.wait_state(PROMPT, "unknown", since=since)  # available
    watcher = Client(broker.port)
    try:
        watcher.subscribe(f"{agent.prefix}/{DEVICE}/ha/#")
        since = ha.mark()
        watcher.publish(PROMPT_TOPIC, "Say hello")
        assert first(watcher, f"{agent.prefix}/{DEVICE}/ha/prompt")[1] == b"Say hello"
        answer = json.loads(first(watcher, f"{agent.prefix}/{DEVICE}/ha/answer")[1])
    finally:
        watcher.close()
    assert answer["ok"], answer
    shown(ha, ANSWER, answer["text"][:255].strip(), since)


def test_a_removed_rule_goes_and_a_restarted_home_assistant_gets_the_device_from_the_agent(
        ha: HomeAssistant, broker: Broker, started: tuple[AgentProcess, int]) -> None:
    agent, _ = started
    since = ha.mark()
    agent.rewrite(watch={"door": RULES["door"]})
    for entity in GONE:
        ha.wait_for(re.escape(f"Removing component: {entity}") + "$", since=since)
        ha.wait_for(re.escape(f"entity_registry_updated[L]: action=remove, entity_id={entity}>"), since=since)
    assert len(ha.lines("Removing component: ", since)) == len(GONE)
    ha.stop()
    # No retained document left: only the agent, answering HA's birth, can bring the device back.
    cleaner = Client(broker.port)
    cleaner.client.publish(f"homeassistant/device/{DEVICE}/config", b"", qos=1, retain=True).wait_for_publish(5)
    cleaner.close()
    births = agent.count_events("homeassistant.birth")
    ha.start()  # a new log: marks start from 0 again
    live = [entity for entity in ENTITIES if entity not in GONE]
    for entity in live:  # restored from HA's registry as unavailable, then live again
        ha.wait_for(rf"state_changed\[L\]: entity_id={re.escape(entity)}, .*new_state=<state "
                    rf"{re.escape(entity)}=(?!unavailable)")
    assert agent.count_events("homeassistant.birth") == births + 1
    assert len(ha.lines(f"Found new component: .* {DEVICE} ")) == len(live)
    assert ha.lines(DISCOVERY_ERRORS) == []
    ha.wait_state(f"binary_sensor.{NODE}_status", "on")


def test_a_killed_agent_goes_unavailable_by_its_last_will(
        ha: HomeAssistant, broker: Broker, started: tuple[AgentProcess, int]) -> None:
    agent, _ = started
    since = ha.mark()
    agent.proc.kill()  # no goodbye: the broker sends the will once keepalive (5 s) runs out
    for entity in ENTITIES:
        if entity not in GONE:
            ha.wait_state(entity, "unavailable", since=since, timeout=20)
    assert retained(broker, agent.status_topic)["state"] == "offline"
