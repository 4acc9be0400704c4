"""The only module that imports paho: the broker link of the daemon and the `ask` client.

The link runs its own network thread: connect, keep alive, reconnect with capped jittered
back-off, resubscribe after every reconnect. Callbacks only translate and hand over; an
exception escaping a paho callback would silently kill the network thread.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.backoff import backoff_delay
from edge_agent.errors import BrokerError
from edge_agent.log import get_logger
from edge_agent.settings import MqttSettings

log = get_logger("mqtt")
LOOP_TIMEOUT_S = 0.2
# systemd's LoadCredential= puts secrets in $CREDENTIALS_DIRECTORY under these names.
PASSWORD_CREDENTIAL = "mqtt-password"
TLS_KEY_CREDENTIAL = "mqtt-tls-key"


@dataclass(frozen=True)
class Incoming:
    """A received message, free of paho types."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None


def _new_client(settings: MqttSettings, client_id: str) -> paho.Client:
    v5 = settings.protocol == "5"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                         clean_session=None if v5 else True, reconnect_on_failure=False)
    client.on_socket_open = _no_delay
    if settings.username:
        client.username_pw_set(settings.username,
                               _read_password(settings.password_file or _credential(PASSWORD_CREDENTIAL)))
    if settings.tls is not None:
        key_file = settings.tls.key_file
        if key_file is None and settings.tls.cert_file is not None:
            key_file = _credential(TLS_KEY_CREDENTIAL)
        try:
            client.tls_set(ca_certs=_opt(settings.tls.ca_file), certfile=_opt(settings.tls.cert_file),
                           keyfile=_opt(key_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot set up TLS: {exc}") from exc
    return client


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Turn Nagle off: an answer is one small packet, and Nagle can hold it up to 40 ms
    waiting for the ACK of the previous one (measured in bench/RESULTS.md)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (unix/websocket transports)
        pass


def _opt(path: Path | None) -> str | None:
    return str(path) if path else None


def _credential(name: str) -> Path | None:
    """A secret systemd handed over with LoadCredential=, if this process got one by that name."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / name
    try:  # blank: the unit's SetCredential= placeholder, standing in for a file not installed
        return path if path.read_bytes().strip() else None
    except OSError:
        return None


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise BrokerError(f"cannot read the MQTT password from {path}: {exc.strerror or exc}") from exc


def _incoming(message: paho.MQTTMessage) -> Incoming:
    props = getattr(message, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props else None
    correlation = getattr(props, "CorrelationData", None) if props else None
    expiry = getattr(props, "MessageExpiryInterval", None) if props else None
    return Incoming(message.topic, bytes(message.payload), response_topic, correlation, expiry)


class BrokerLink:
    """The daemon's connection: status will, request subscriptions, QoS 1 publishing.

    `shared_topic` (a `$share/<group>/...` filter) is subscribed and dropped together with
    the request topic: the broker hands each message on it to one member of the group."""

    def __init__(self, settings: MqttSettings, client_id: str, *, request_topic: str,
                 will_topic: str, will_payload: bytes, on_message: Callable[[Incoming], None],
                 on_connected: Callable[[], None], shared_topic: str | None = None) -> None:
        self._settings = settings
        self._request_topics = [t for t in (request_topic, shared_topic) if t]
        self._shared_topic = shared_topic
        self._on_message = on_message
        self._on_connected = on_connected
        self._v5 = settings.protocol == "5"
        self._client = _new_client(settings, client_id)
        self._client.will_set(will_topic, will_payload, qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_log = self._handle_log
        self._last_error: str | None = None  # paho's last error text: the why of a lost link
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._closing = threading.Event()  # disconnect asked: keep looping, never reconnect
        self._subscribed = False
        self._thread = threading.Thread(target=self._network_loop, name="mqtt", daemon=True)
        self.last_loop_at = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._client.connect_async(self._settings.host, self._settings.port, self._settings.keepalive)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def loop_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and end the network thread."""
        self._closing.set()
        if self._connected.is_set():
            self._client.disconnect()
        deadline = time.monotonic() + timeout
        while self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stopping.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)

    # --- requests ----------------------------------------------------------------------
    def accept_requests(self, accept: bool) -> None:
        """Subscribe (now and after every reconnect) or unsubscribe the request topics."""
        self._subscribed = accept
        if not self._connected.is_set():
            return
        if accept:
            self._subscribe(self._client)
        else:
            self._client.unsubscribe(self._request_topics)

    def _subscribe(self, client: paho.Client) -> None:
        client.subscribe([(topic, 1) for topic in self._request_topics])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                correlation_data: bytes | None = None, qos: int = 1) -> paho.MQTTMessageInfo:
        """QoS 1 (default): paho queues it while disconnected and sends it after reconnect.
        QoS 0 is dropped while disconnected: for data that is stale by the time we are back."""
        props = None
        if self._v5 and correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation_data
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def publish_and_wait(self, topic: str, payload: bytes, *, retain: bool = False,
                         timeout: float = 5.0) -> bool:
        """Publish and wait for the broker's PUBACK; False if it did not come in time."""
        info = self.publish(topic, payload, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    # --- network thread ------------------------------------------------------------------
    def _network_loop(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self.last_loop_at = time.monotonic()
            if self._client.socket() is None:
                if self._closing.is_set():
                    break
                failure = self._connect()
                if failure is not None:
                    delay = backoff_delay(attempt, self._settings.reconnect_min_s,
                                          self._settings.reconnect_max_s)
                    attempt += 1
                    log.warning("mqtt.connect_failed", host=self._settings.host,
                                port=self._settings.port, error=failure, retry_in_s=round(delay, 2))
                    self._stopping.wait(delay)
                    continue
            rc = self._client.loop(timeout=LOOP_TIMEOUT_S)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self._connected.is_set():
                    attempt = 0
                continue
            if self._stopping.is_set() or self._closing.is_set():
                break
            delay = backoff_delay(attempt, self._settings.reconnect_min_s, self._settings.reconnect_max_s)
            attempt += 1
            error, self._last_error = self._last_error, None
            log.warning("mqtt.connection_lost", rc=paho.error_string(rc), error=error,
                        retry_in_s=round(delay, 2))
            self._stopping.wait(delay)

    def _connect(self) -> str | None:
        """Open the connection and send CONNECT; None, or why that failed."""
        self._last_error = None
        try:
            rc = self._client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as exc:
            return str(exc)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:  # closed at once: e.g. a TLS alert met the CONNECT
            return self._last_error or paho.error_string(rc)
        return None

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                        properties: Any) -> None:
        try:
            if reason.is_failure:
                log.error("mqtt.refused", reason=str(reason))
                return
            self._connected.set()
            log.info("mqtt.connected", host=self._settings.host, port=self._settings.port,
                     protocol=self._settings.protocol, tls=self._settings.tls is not None)
            if self._shared_topic and getattr(properties, "SharedSubscriptionAvailable", 1) == 0:
                log.error("mqtt.shared_unavailable", topic=self._shared_topic,
                          reason="the broker says it has no shared subscriptions")
            if self._subscribed:
                self._subscribe(client)
            self._on_connected()
        except Exception:  # noqa: BLE001 - must never escape into paho's thread
            log.exception("mqtt.on_connect_failed")

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                          properties: Any) -> None:
        try:  # this link's only SUBSCRIBE is the request topics, in this order
            for topic, reason in zip(self._request_topics, reasons):
                if reason.is_failure:  # e.g. an ACL, or a broker without shared subscriptions
                    log.error("mqtt.subscribe_refused", topic=topic, reason=str(reason))
                else:
                    log.info("mqtt.subscribed", topic=topic)
        except Exception:  # noqa: BLE001 - must never escape into paho's thread
            log.exception("mqtt.on_subscribe_failed")

    def _handle_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        # A TLS alert after the handshake (mutual TLS refused, certificate revoked) reaches
        # us only as paho's log line "failed to receive on socket: [SSL: ...]".
        if level == paho.MQTT_LOG_ERR:
            self._last_error = text

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                           properties: Any) -> None:
        self._connected.clear()
        log.info("mqtt.disconnected", reason=str(reason))

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._on_message(_incoming(message))
        except Exception:  # noqa: BLE001 - must never escape into paho's thread
            log.exception("mqtt.on_message_failed", topic=message.topic)


def ask_once(settings: MqttSettings, request_topic: str, make_payload: Callable[[str | None], bytes],
             timeout_s: float) -> bytes | None:
    """Publish one request and wait for its answer; None: no answer in time.

    MQTT 5 uses the Response Topic and Correlation Data properties; 3.1.1 has neither, so
    `make_payload` gets the private reply topic to put in the request's `reply_to`."""
    correlation = uuid.uuid4().bytes
    reply_topic = f"{request_topic.rsplit('/', 1)[0]}/ask/{uuid.uuid4().hex}"
    client = _new_client(settings, f"edge-agent-ask-{uuid.uuid4().hex[:12]}")
    answer: list[bytes] = []
    refused: list[str] = []
    got = threading.Event()
    subscribed = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:  # wrong password, not authorized: say so instead of timing out
            refused.append(str(reason))
            subscribed.set()
        else:
            c.subscribe(reply_topic, qos=1)

    def on_message(c: paho.Client, u: Any, message: paho.MQTTMessage) -> None:
        data = _incoming(message)
        if data.correlation_data in (None, correlation):
            answer.append(data.payload)
            got.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = on_message
    deadline = time.monotonic() + timeout_s
    try:
        client.connect(settings.host, settings.port, settings.keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"cannot connect to {settings.host}:{settings.port}: {exc}") from exc
    client.loop_start()
    try:
        if not subscribed.wait(max(0.1, deadline - time.monotonic())):
            return None
        if refused:
            raise BrokerError(f"the broker at {settings.host}:{settings.port} refused the "
                              f"connection: {refused[0]}")
        if settings.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = correlation
            client.publish(request_topic, make_payload(None), qos=1, properties=props)
        else:
            client.publish(request_topic, make_payload(reply_topic), qos=1)
        got.wait(max(0.0, deadline - time.monotonic()))
        return answer[0] if answer else None
    finally:
        client.disconnect()
        client.loop_stop()

