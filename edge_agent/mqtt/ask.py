"""`edge-agent ask`: one request, one answer, as a user's pipeline would do it."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from typing import Any, Callable

import paho.mqtt.client as paho

from edge_agent.errors import BrokerError
from edge_agent.mqtt.client import JSON, incoming, new_client, publish_properties
from edge_agent.settings.model import MqttSettings


def ask_once(settings: MqttSettings, request_topic: str, make_payload: Callable[[str | None], bytes],
             timeout_s: float, on_chunk: Callable[[bytes], bool] | None = None) -> bytes | None:
    """Publish one request and wait for its answer; None: no answer in time.

    MQTT 5 uses the Response Topic and Correlation Data properties; 3.1.1 has neither, so
    `make_payload` gets the private reply topic to put in the request's `reply_to`.
    `on_chunk` sees every message first and returns True for a stream chunk (not the answer)."""
    correlation = uuid.uuid4().bytes
    reply_topic = f"{request_topic.rsplit('/', 1)[0]}/ask/{uuid.uuid4().hex}"
    client = new_client(settings, f"edge-agent-ask-{uuid.uuid4().hex[:12]}")
    answer: list[bytes] = []
    refused: list[str] = []
    got = threading.Event()
    subscribed = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:  # wrong password, not authorized: say so instead of timing out
            refused.append(str(reason))
            subscribed.set()
        else:
            c.subscribe(reply_topic, qos=2)

    def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
        data = incoming(message)
        if data.correlation_data not in (None, correlation) or got.is_set():
            return
        try:
            if on_chunk is not None and on_chunk(data.payload):
                return
        except Exception:  # noqa: BLE001 - must never escape into paho's thread; the answer still ends it
            pass
        answer.append(data.payload)
        got.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = on_message
    deadline = time.monotonic() + timeout_s
    _start(client, settings)
    try:
        if not subscribed.wait(max(0.1, deadline - time.monotonic())):
            return None
        if refused:
            raise BrokerError(f"the broker at {settings.host}:{settings.port} refused the "
                              f"connection: {refused[0]}")
        if settings.protocol == "5":
            props = publish_properties(response_topic=reply_topic, correlation_data=correlation, content_type=JSON)
            client.publish(request_topic, make_payload(None), qos=1, properties=props)
        else:
            client.publish(request_topic, make_payload(reply_topic), qos=1)
        got.wait(max(0.0, deadline - time.monotonic()))
        return answer[0] if answer else None
    finally:
        client.disconnect()
        client.loop_stop()


def read_retained(settings: MqttSettings, topic_filters: list[str], quiet_s: float = 0.5,
                  timeout_s: float = 5.0) -> dict[str, bytes]:
    """The retained messages under `topic_filters` (topic -> payload): the broker sends them
    right after the subscription; done once none came for `quiet_s`."""
    client = new_client(settings, f"edge-agent-read-{uuid.uuid4().hex[:12]}")
    found: dict[str, bytes] = {}
    refused: list[str] = []
    last = [time.monotonic()]
    subscribed = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
            subscribed.set()
        else:
            c.subscribe([(t, 1) for t in topic_filters])

    def on_subscribe(*args: Any) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
        if message.retain and message.payload:
            found[message.topic] = message.payload
            last[0] = time.monotonic()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    deadline = time.monotonic() + timeout_s
    _start(client, settings)
    try:
        if not subscribed.wait(max(0.1, deadline - time.monotonic())) or refused:
            raise BrokerError(f"the broker at {settings.host}:{settings.port} did not take the "
                              f"subscription{': ' + refused[0] if refused else ''}")
        while time.monotonic() < deadline and time.monotonic() - last[0] < quiet_s:
            time.sleep(0.05)
        return dict(found)
    finally:
        client.disconnect()
        client.loop_stop()


def _start(client: paho.Client, settings: MqttSettings) -> None:
    """Connect and start paho's thread; a broker out of reach is a BrokerError."""
    try:
        client.connect(settings.host, settings.port, settings.keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot connect to {settings.host}:{settings.port}: {exc}") from exc
    client.loop_start()
