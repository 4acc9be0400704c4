"""The daemon's broker link. It runs its own network thread: connect, keep alive, reconnect
with capped jittered back-off, resubscribe after every reconnect. Callbacks only translate and
hand over; an exception escaping a paho callback would silently kill the network thread."""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.backoff import backoff_delay
from edge_agent.log import get_logger
from edge_agent.mqtt.client import JSON, Incoming, incoming, new_client, publish_properties
from edge_agent.settings.model import MqttSettings

log = get_logger("mqtt")
LOOP_TIMEOUT_S = 0.2


class BrokerLink:
    """The daemon's connection: status will, request subscriptions, QoS 1 publishing.

    `will_payload()` is asked before every (re)connect: the broker keeps the will a CONNECT
    carried for that connection, and MQTT has no way to change it on a live one.
    `shared_topic` (a `$share/<group>/...` filter) is subscribed and dropped together with
    the request topic: the broker hands each message on it to one member of the group."""

    def __init__(self, settings: MqttSettings, client_id: str, *, request_topic: str,
                 will_topic: str, will_payload: Callable[[], bytes], on_message: Callable[[Incoming], None],
                 on_connected: Callable[[], None], shared_topic: str | None = None,
                 receive_maximum: int = 65535, control_topics: tuple[str, ...] = ()) -> None:
        self._settings = settings
        self._receive_maximum = receive_maximum
        # control_topics (cancel) come and go with the request topics, through the same callback
        self._request_topics = [t for t in (request_topic, shared_topic, *control_topics) if t]
        self._shared_topic = shared_topic
        self._on_message = on_message
        self._on_connected = on_connected
        self._v5 = settings.protocol == "5"
        self._client = new_client(settings, client_id, persistent=True)
        self._client.on_publish = self._handle_publish
        self._track_lock = threading.Lock()
        # mid -> (on_acked, topic, on_refused)
        self._on_acked: dict[int, tuple[Callable[[], None], str, Callable[[str], None] | None]] = {}
        self._early_acks: dict[int, Any] = {}  # PUBACKs that beat publish() returning -> refusal
        self._will_topic, self._will_payload = will_topic, will_payload
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_log = self._handle_log
        # Only the network thread writes to the socket. Without this, paho's publish() (client
        # not started with loop_start) writes at once from the calling thread, unlocked, while
        # the network thread may write too: with several workers publishing, packets went out
        # of order (stream chunks 2..5 before 1), and a partial write could interleave bytes.
        # With a register-write callback paho only queues and wakes our loop through its
        # socket pair; the loop's select sees the pending write at once.
        self._client.on_socket_register_write = _nothing_with
        self._client.on_socket_unregister_write = _nothing_with
        self._last_error: str | None = None  # paho's last error text: the why of a lost link
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._closing = threading.Event()  # disconnect asked: keep looping, never reconnect
        self._subscribed = False
        self._subscription_lock = threading.Lock()
        self._thread = threading.Thread(target=self._network_loop, name="mqtt", daemon=True)
        self.last_loop_at = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        props = None
        clean_start: bool = True
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._settings.session_expiry_s
            # Without it MQTT 5 means 65535: after an outage mosquitto hands us its whole backlog
            # at once, whatever its max_inflight_messages says.
            props.ReceiveMaximum = self._receive_maximum
            clean_start = self._settings.session_expiry_s == 0
        self._client.connect_async(self._settings.host, self._settings.port, self._settings.keepalive,
                                   clean_start=clean_start if self._v5 else 3, properties=props)
        self._thread.start()

    def ack(self, message: Incoming) -> None:
        """Acknowledge a request (PUBACK) once its answer is safe; until then a crash means the
        broker delivers it again."""
        if message.qos > 0 and message.mid:
            self._client.ack(message.mid, message.qos)

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
    def accept_requests(self, accept: bool, *, keep_session: bool = False) -> None:
        """Subscribe (now and after every reconnect) or unsubscribe the request topics.
        `keep_session`: going away for a restart: leave the pool (the others take its share)
        but keep the device's own subscription in the broker session, so requests sent
        meanwhile wait for us instead of going nowhere."""
        with self._subscription_lock:  # either this or the next on_connect subscribes
            self._subscribed = accept
            if not self._connected.is_set():
                return
            if accept:
                self._subscribe(self._client)
                return
        keep = keep_session and self._settings.session_expiry_s > 0
        topics = [t for t in self._request_topics if t == self._shared_topic] if keep else self._request_topics
        if topics:
            self._client.unsubscribe(topics)

    def _subscribe(self, client: paho.Client) -> None:
        client.subscribe([(topic, 1) for topic in self._request_topics])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                correlation_data: bytes | None = None, qos: int = 1,
                on_acked: Callable[[], None] | None = None, response_topic: str | None = None,
                expiry_s: int | None = None, user_properties: tuple[tuple[str, str], ...] = (),
                on_refused: Callable[[str], None] | None = None, content_type: str | None = JSON,
                payload_format: int | None = None) -> paho.MQTTMessageInfo:
        """QoS 1 (default) and 2: paho queues it while disconnected and sends it after reconnect;
        `on_acked` runs on the network thread when the broker's PUBACK (QoS 2: PUBCOMP) arrives,
        `on_refused` (if given) instead of it when that acknowledgement refuses the message.
        QoS 0 is dropped while disconnected: for data that is stale by the time we are back.
        `content_type` (JSON unless told) and `payload_format` (None: UTF-8 for JSON and text/*)
        tell MQTT 5 subscribers what the bytes are; an empty payload (a retained message
        deleted) says nothing. The MQTT 5 properties are left out on 3.1.1, which has none."""
        if not payload:
            content_type, payload_format = None, 0
        props = publish_properties(correlation_data=correlation_data, response_topic=response_topic,
                                   expiry_s=expiry_s, user_properties=user_properties, content_type=content_type,
                                   payload_format=payload_format) if self._v5 else None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        # Every publish is tracked (QoS 0 "acks" when written), so no stale early ack can
        # match a packet id paho reuses later.
        self._track(info.mid, on_acked or _nothing, topic, on_refused)
        return info

    def _track(self, mid: int, callback: Callable[[], None], topic: str,
               on_refused: Callable[[str], None] | None = None) -> None:
        with self._track_lock:
            refusal = self._early_acks.pop(mid, _NOT_YET)
            if refusal is _NOT_YET:
                self._on_acked[mid] = (callback, topic, on_refused)
                return
        self._acked(callback, topic, on_refused, refusal)

    @staticmethod
    def _acked(callback: Callable[[], None], topic: str, on_refused: Callable[[str], None] | None,
               refusal: Any) -> None:
        if refusal is not None:
            # MQTT 5: the broker took the packet but refuses the message (an ACL: "Not
            # authorized"). Sending it again would be refused again: say so, and let it go.
            log.error("mqtt.publish_refused", topic=topic, reason=str(refusal))
            if on_refused is not None:
                on_refused(str(refusal))
                return
        callback()

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                        properties: Any) -> None:
        try:
            refusal = reason if getattr(reason, "is_failure", False) else None
            with self._track_lock:
                tracked = self._on_acked.pop(mid, None)
                if tracked is None:
                    self._early_acks[mid] = refusal
            if tracked is not None:
                self._acked(*tracked, refusal)
        except Exception:  # noqa: BLE001 - must never escape into paho's thread
            log.exception("mqtt.on_publish_failed")

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
        # paho puts the will into the CONNECT that reconnect() builds, on this thread.
        props = publish_properties(content_type=JSON, packet=PacketTypes.WILLMESSAGE) if self._v5 else None
        self._client.will_set(self._will_topic, self._will_payload(), qos=1, retain=True, properties=props)
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
            # SUBSCRIBE goes out before anything published once `connected` reads True: the
            # broker handles a connection's packets in order, so no one sees our `ready`
            # status before our subscription exists (a request sent on seeing it would be lost).
            with self._subscription_lock:
                if self._subscribed:
                    self._subscribe(client)
                self._connected.set()
            log.info("mqtt.connected", host=self._settings.host, port=self._settings.port,
                     protocol=self._settings.protocol, tls=self._settings.tls is not None)
            if self._shared_topic and getattr(properties, "SharedSubscriptionAvailable", 1) == 0:
                log.error("mqtt.shared_unavailable", topic=self._shared_topic,
                          reason="the broker says it has no shared subscriptions")
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
        # One loop() call may handle a long burst of requests (seconds, under overload): each
        # one handled is progress too, or the watchdog pings would stop for a busy, healthy loop.
        self.last_loop_at = time.monotonic()
        try:
            self._on_message(incoming(message))
        except Exception:  # noqa: BLE001 - must never escape into paho's thread
            log.exception("mqtt.on_message_failed", topic=message.topic)


def _nothing() -> None:
    return None


def _nothing_with(*args: Any) -> None:
    return None


_NOT_YET = object()
