"""MQTT 5's Content Type and Payload Format Indicator, read by a real client as a user's
pipeline (Node-RED, MQTT Explorer) would: a real mosquitto, the daemon as a process."""

from __future__ import annotations

import json
import queue
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt import BrokerLink, Incoming
from edge_agent.settings.model import MqttSettings
from support import AgentProcess, Broker, Client, ask, file_camera, running_agent
from video import make_still_clip

JSON = ("application/json", 1)
TEXT = ("text/plain; charset=utf-8", 1)


def says(props: Any) -> tuple[str | None, int | None]:
    """What a message's properties say its bytes are: (Content Type, Payload Format Indicator)."""
    return getattr(props, "ContentType", None), getattr(props, "PayloadFormatIndicator", None)


def raw(client: Client, topic: str, timeout: float = 30) -> tuple[bytes, Any]:
    """The next message on `topic` as it came (payload undecoded), skipping others."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            got, payload, props = client.messages.get(timeout=left)
        except queue.Empty:
            break
        if got == topic:
            return payload, props
    raise TimeoutError(f"nothing on {topic}")


@pytest.fixture(scope="module")
def agent(module_broker: Broker, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    folder = tmp_path_factory.mktemp("content")
    still = make_still_clip(folder / "still.avi", seconds=2, size="320x240")
    yield from running_agent(folder, module_broker.port, tiny_model, stream__interval_ms=0,
                             cameras={"yard": file_camera(still, motion=True)})


def test_answer_chunks_status_and_motion_say_what_they_are(module_broker: Broker, agent: AgentProcess) -> None:
    pipeline = Client(module_broker.port)
    try:
        pipeline.subscribe(agent.response_topic)
        pipeline.publish(agent.request_topic, json.dumps({"id": "ct", "prompt": "hi", "max_tokens": 6,
                                                          "stream": True}))
        seen = []
        while True:
            _, doc, props = pipeline.next()
            seen.append(("delta" in doc, says(props)))
            if doc.get("done"):
                break
        assert seen[0][0] and seen[-1] == (False, JSON)  # chunks, then the answer
        assert all(kind == JSON for _, kind in seen)
        assert says(_retained(module_broker, agent.status_topic)[1]) == JSON
        payload, props = _retained(module_broker, f"{agent.prefix}/{agent.device_id}/camera/yard/motion")
        assert payload == b"OFF" and says(props) == TEXT
    finally:
        pipeline.close()


def _retained(broker: Broker, topic: str) -> tuple[bytes, Any]:
    """A retained message as a newcomer gets it: the broker keeps its properties too."""
    reader = Client(broker.port)
    try:
        reader.subscribe(topic)
        return raw(reader, topic)
    finally:
        reader.close()


def test_last_will_is_json_too(broker: Broker, client: Client, tiny_model: Path, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, broker.port, tiny_model)
    agent.start(client)
    try:
        agent.stop(signal.SIGKILL)  # no clean goodbye: the broker publishes the will
        doc = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("state") == "offline")
        assert doc["state"] == "offline"
        payload, props = _retained(broker, agent.status_topic)
        assert json.loads(payload)["state"] == "offline" and says(props) == JSON
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()


def test_mqtt_311_agent_answers_without_properties(broker: Broker, client: Client, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, broker.port, tiny_model, mqtt__protocol="3.1.1")
    agent.start(client)
    try:
        client.subscribe(agent.response_topic)
        rid = "old-link"
        client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 2}))
        while True:
            _, doc, props = client.next()
            if doc.get("id") == rid:
                break
        assert doc["ok"] is True and says(props) == (None, None)
    finally:
        agent.stop()


@pytest.fixture
def link(broker: Broker) -> Iterator[tuple[BrokerLink, queue.Queue[Incoming]]]:
    """The daemon's own link on the real broker, taking requests on `t/request`."""
    got: queue.Queue[Incoming] = queue.Queue()
    link = BrokerLink(MqttSettings(port=broker.port, session_expiry_s=0), "ct-link", request_topic="t/request",
                      will_topic="t/status", will_payload=lambda: b"{}", on_message=got.put,
                      on_connected=lambda: None)
    link.accept_requests(True)
    link.start()
    assert link.wait_connected(10)
    link.publish("t/request", b"{}")  # back through the broker once the subscription is live
    got.get(timeout=10)
    yield link, got
    link.stop()


@pytest.mark.parametrize("kwargs, payload, expected", [
    ({}, b'{"a": 1}', JSON),
    ({"content_type": "text/plain; charset=utf-8"}, b"ON", TEXT),
    ({"content_type": "image/jpeg"}, b"\xff\xd8\xff", ("image/jpeg", None)),  # bytes: no indicator
    ({}, b"", (None, None)),  # an empty retained payload deletes: it says nothing
    ({"content_type": None, "payload_format": 0}, b"\x00", (None, None)),
    ({"content_type": "application/json", "payload_format": 0}, b"{}", ("application/json", None)),
])
def test_publish_says_what_it_is_told(link: tuple[BrokerLink, queue.Queue[Incoming]], client: Client,
                                      kwargs: dict[str, Any], payload: bytes,
                                      expected: tuple[str | None, int | None]) -> None:
    topic = f"t/out/{uuid.uuid4().hex}"
    client.subscribe(topic)
    link[0].publish(topic, payload, retain=not payload, **kwargs)
    got, props = raw(client, topic, 10)
    assert got == payload and says(props) == expected


def test_incoming_keeps_what_the_sender_said(link: tuple[BrokerLink, queue.Queue[Incoming]], client: Client) -> None:
    """What a fleet hand-back re-publishes as it came."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType, props.PayloadFormatIndicator = "application/json", 1
    client.client.publish("t/request", b"{}", qos=1, properties=props).wait_for_publish(5)
    client.client.publish("t/request", b"{}", qos=1).wait_for_publish(5)
    said, bare = link[1].get(timeout=10), link[1].get(timeout=10)
    assert (said.content_type, said.payload_format) == ("application/json", 1)
    assert (bare.content_type, bare.payload_format) == (None, 0)
