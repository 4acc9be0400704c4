"""Client set-up shared by the daemon's link and `edge-agent ask`: protocol, credentials
(files or systemd credentials), TLS, TCP_NODELAY. The mqtt package is the only one importing paho."""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import BrokerError
from edge_agent.settings.model import MqttSettings

# systemd's LoadCredential= puts secrets in $CREDENTIALS_DIRECTORY under these names.
PASSWORD_CREDENTIAL = "mqtt-password"
TLS_KEY_CREDENTIAL = "mqtt-tls-key"
# MQTT 5 Content Type of nearly everything the agent publishes: answers, chunks, status, rules.
JSON = "application/json"


@dataclass(frozen=True)
class Incoming:
    """A received message, free of paho types."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None
    mid: int = 0  # packet id, for the acknowledgement we send once the answer is safe
    qos: int = 0
    dup: bool = False  # the broker handed us this one before (it never saw our PUBACK)
    user_properties: tuple[tuple[str, str], ...] = ()  # MQTT 5 User Property pairs, in order
    content_type: str | None = None  # MQTT 5 Content Type, as the sender set it
    payload_format: int = 0  # MQTT 5 Payload Format Indicator: 1 UTF-8 text, 0 (or absent) bytes


def new_client(settings: MqttSettings, client_id: str, *, persistent: bool = False) -> paho.Client:
    """`persistent`: the daemon's link, a broker session that outlives the connection and
    messages acknowledged by us (manual ack) only once their answer is safe."""
    v5 = settings.protocol == "5"
    keep = persistent and settings.session_expiry_s > 0
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                         clean_session=None if v5 else not keep, reconnect_on_failure=False,
                         manual_ack=persistent)
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


def publish_properties(*, correlation_data: bytes | None = None, response_topic: str | None = None,
                       expiry_s: int | None = None, user_properties: tuple[tuple[str, str], ...] = (),
                       content_type: str | None = None, payload_format: int | None = None,
                       packet: int = PacketTypes.PUBLISH) -> Properties | None:
    """The MQTT 5 properties of a PUBLISH (or, with `packet`, a will), or None when it carries
    none. MQTT 3.1.1 has no properties: there a caller sends None. `payload_format` None: 1
    (UTF-8) for a JSON or text/* content type, else none (0 and absent mean the same)."""
    if payload_format is None:
        payload_format = 1 if _is_text(content_type) else 0
    if (correlation_data is None and not response_topic and not expiry_s and not user_properties
            and not content_type and not payload_format):
        return None
    props = Properties(packet)
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if response_topic:
        props.ResponseTopic = response_topic
    if expiry_s:
        props.MessageExpiryInterval = expiry_s
    for pair in user_properties:  # each assignment adds one pair
        props.UserProperty = pair
    if content_type:
        props.ContentType = content_type
    if payload_format:
        props.PayloadFormatIndicator = payload_format
    return props


def _is_text(content_type: str | None) -> bool:
    """Whether a payload of this content type is UTF-8 text (JSON is, by RFC 8259)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == JSON or kind.startswith("text/")


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


def incoming(message: paho.MQTTMessage) -> Incoming:
    props = getattr(message, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props else None
    correlation = getattr(props, "CorrelationData", None) if props else None
    expiry = getattr(props, "MessageExpiryInterval", None) if props else None
    user = getattr(props, "UserProperty", None) if props else None
    content_type = getattr(props, "ContentType", None) if props else None
    payload_format = getattr(props, "PayloadFormatIndicator", 0) if props else 0
    return Incoming(message.topic, bytes(message.payload), response_topic, correlation, expiry,
                    message.mid, message.qos, bool(message.dup),
                    tuple((str(k), str(v)) for k, v in user or ()), content_type, int(payload_format or 0))


