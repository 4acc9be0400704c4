"""Home Assistant MQTT device discovery: one retained document announces the agent and all its
entities. Pure: builds payloads only; ha_bridge.py publishes them.

Keys are HA's own abbreviations (homeassistant/components/mqtt/abbreviations.py, checked
against 2025.1.4): HA drops unknown keys of a discovered entity silently, so a misspelt key is
a feature that quietly does not work. Templates are rendered by HA's Jinja (its `to_json`
filter included). HA keeps a state to 255 characters, so every state template cuts there and
the long text goes to attributes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.protocol import Topics

MAX_STATE_CHARS = 255  # HA's limit on an entity state, and on a text entity's `max`
# HA's device-discovery topic and component ids allow only these characters; our names may
# also hold "." (settings: [A-Za-z0-9_.-]).
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

_AVAILABLE = "{{ 'offline' if value_json.state == 'offline' else 'online' }}"
_CONNECTED = "{{ 'ON' if value_json.state == 'ready' else 'OFF' }}"
# "None" is HA's word for "unknown": no speed measured yet (tokens_per_s is null).
_TOKENS_PER_S = "{{ value_json.tokens_per_s if value_json.tokens_per_s is number else 'None' }}"
_QUEUE_DEPTH = "{{ value_json.queue_depth }}"
_ANSWER = ("{% set d = value_json %}"
           "{{ ((d.text if d.ok else (d.error or {}).message) | string)[:255] }}")
_RULE_TEXT = "{{ (value_json.text | string)[:255] }}"
# What a user reads beside the state; the rule's frames and timings are the agent's bookkeeping.
_RULE_ATTRIBUTES = ("{{ {'text': value_json.get('text'), 'json': value_json.get('json'), "
                    "'at': value_json.get('at'), 'changed': value_json.get('changed'), "
                    "'previous': value_json.get('previous')} | to_json }}")


def discovery_topic(discovery_prefix: str, device_id: str) -> str:
    return f"{discovery_prefix}/device/{_safe(device_id)}/config"


def removal_payload() -> bytes:
    """Published retained on the discovery topic, this removes the device and its entities."""
    return b""


@dataclass(frozen=True)
class RuleEntity:
    """How a watch rule shows in HA: a binary_sensor on `json[boolean_key]`, else a sensor on
    `json[value_key]`, else a sensor on the answer text."""

    name: str
    boolean_key: str | None = None
    value_key: str | None = None
    snapshot: bool = False  # also an `image` entity showing the rule's snapshot


def rule_entity(name: str, change_key: tuple[str, ...], response_format: dict[str, Any] | None,
                snapshot: bool = False) -> RuleEntity:
    """One field that decides the change is what HA should show; a boolean one (per the rule's
    json_schema) is an on/off sensor."""
    if len(change_key) != 1:
        return RuleEntity(name, snapshot=snapshot)
    key = change_key[0]
    kind = _schema_type(response_format, key)
    # ["boolean", "null"] is a nullable boolean: HA shows null as unknown.
    if kind == "boolean" or (isinstance(kind, list) and "boolean" in kind and set(kind) <= {"boolean", "null"}):
        return RuleEntity(name, boolean_key=key, snapshot=snapshot)
    return RuleEntity(name, value_key=key, snapshot=snapshot)


def _schema_type(response_format: dict[str, Any] | None, key: str) -> Any:
    """The `type` of top-level property `key` in a json_schema response_format, else None."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    block = response_format.get("json_schema")
    schema = block.get("schema") if isinstance(block, dict) else None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    prop = properties.get(key) if isinstance(properties, dict) else None
    return prop.get("type") if isinstance(prop, dict) else None


def discovery_payload(topics: Topics, *, device_id: str, version: str, model: str,
                      cameras_with_motion: Iterable[str], rules: Iterable[RuleEntity],
                      zones: Iterable[tuple[str, str]] = (), previous: Mapping[str, str] = {}, origin_url: str | None = None,
                      ) -> dict[str, Any]:  # noqa: B006 (previous is only read)
    """The device-discovery document. `previous`: component id -> platform as announced last
    time (`components()` of that payload); ids gone since are sent as `{"p": platform}`, which
    is how HA learns to remove them (it does not remove what is merely left out).
    `origin_url`: a support URL HA shows in its log beside our name."""
    node = f"edge_agent_{_safe(device_id)}"
    cmps: dict[str, dict[str, Any]] = {}

    def add(oid: str, config: dict[str, Any], cid: str | None = None) -> None:
        """`oid` names the entity (entity id, unique id); `cid` the component, default oid.
        qos on each: HA 2025.1 takes a root `qos` but passes it on to no entity."""
        cmps[cid or oid] = {**config, "uniq_id": f"{node}_{oid}", "obj_id": f"{node}_{oid}", "qos": 1}

    add("status", {"p": "binary_sensor", "name": "Connected", "stat_t": topics.status,
                   "val_tpl": _CONNECTED, "dev_cla": "connectivity", "ent_cat": "diagnostic"})
    add("tokens_per_s", {"p": "sensor", "name": "Tokens per second", "stat_t": topics.stats,
                         "val_tpl": _TOKENS_PER_S, "unit_of_meas": "tokens/s", "stat_cla": "measurement",
                         "sug_dsp_prc": 1, "ent_cat": "diagnostic", "ic": "mdi:speedometer"})
    add("queue_depth", {"p": "sensor", "name": "Queue depth", "stat_t": topics.stats,
                        "val_tpl": _QUEUE_DEPTH, "stat_cla": "measurement", "ent_cat": "diagnostic",
                        "ic": "mdi:tray-full"})
    for camera in cameras_with_motion:
        add(f"motion_{_safe(camera)}", {"p": "binary_sensor", "name": f"{_words(camera)} motion",
                                        "stat_t": topics.motion(camera), "dev_cla": "motion"})
    for camera, zone in zones:
        add(f"motion_{_safe(camera)}_zone_{_safe(zone)}",
            {"p": "binary_sensor", "name": f"{_words(camera)} {_words(zone)} motion",
             "stat_t": topics.zone_motion(camera, zone), "dev_cla": "motion"})
    for rule in rules:
        if rule.snapshot:  # raw JPEG bytes on the topic: HA's image platform takes them as they are
            add(f"watch_{_safe(rule.name)}_snapshot", {"p": "image", "name": f"{_words(rule.name)} snapshot",
                                                        "img_t": topics.watch_snapshot(rule.name),
                                                        "cont_type": "image/jpeg"})
        config = _rule_component(topics, rule)
        # A rule may change platform (its change_key or schema changed). HA knows a component
        # by (platform, id), so the id carries the platform: then the old one can be removed.
        oid = f"watch_{_safe(rule.name)}"
        add(oid, config, cid=f"{oid}_{config['p']}")
    add("prompt", {"p": "text", "name": "Prompt", "cmd_t": topics.ha_prompt, "max": MAX_STATE_CHARS,
                   "ic": "mdi:message-question"})
    add("answer", {"p": "sensor", "name": "Answer", "stat_t": topics.ha_answer, "val_tpl": _ANSWER,
                   "json_attr_t": topics.ha_answer, "ic": "mdi:message-reply-text"})
    for cid, platform in previous.items():
        if cid not in cmps:
            cmps[cid] = {"p": platform}
    return {
        "dev": {"ids": [node], "name": f"edge-agent {device_id}", "mdl": model, "sw": version,
                "mf": "edge-agent"},
        "o": {"name": "edge-agent", "sw": version, **({"url": origin_url} if origin_url else {})},
        # Shared by every component; the last will (state offline) makes them unavailable.
        "avty": [{"t": topics.status, "val_tpl": _AVAILABLE}],
        "qos": 1,
        "cmps": cmps,
    }


def components(payload: Mapping[str, Any]) -> dict[str, str]:
    """Component id -> platform of the live components (not those being removed): what to pass
    as `previous` next time."""
    return {cid: config["p"] for cid, config in payload["cmps"].items() if len(config) > 1}


def _rule_component(topics: Topics, rule: RuleEntity) -> dict[str, Any]:
    base = {"name": _words(rule.name), "stat_t": topics.watch(rule.name),
            "json_attr_t": topics.watch(rule.name), "json_attr_tpl": _RULE_ATTRIBUTES}
    # .get, not attribute access: a missing key would make HA log a template warning each time.
    fields = "{% set j = value_json.get('json') %}"
    if rule.boolean_key is not None:
        key = _jinja_string(rule.boolean_key)
        # Unknown ("None") when the answer was not JSON or the field is not a boolean.
        state = f"{{{{ ('ON' if j.get({key}) else 'OFF') if j is mapping and j.get({key}) is boolean else 'None' }}}}"
        return {"p": "binary_sensor", **base, "val_tpl": fields + state}
    if rule.value_key is not None:
        key = _jinja_string(rule.value_key)
        state = (f"{{% set v = j.get({key}) if j is mapping else none %}}{{% if v is none %}}None"
                 f"{{% else %}}{{{{ (v if v is string else v | to_json)[:255] }}}}{{% endif %}}")
        return {"p": "sensor", **base, "val_tpl": fields + state}
    return {"p": "sensor", **base, "val_tpl": _RULE_TEXT}


def _jinja_string(text: str) -> str:
    """A Jinja string literal for `text`: Jinja reads JSON's escapes; non-ASCII stays literal
    (Jinja would read a JSON surrogate pair as two lone surrogates)."""
    return json.dumps(text, ensure_ascii=False)


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)


def _words(name: str) -> str:
    """`front_door` reads as "front door" in HA's entity names."""
    return name.replace("_", " ").replace("-", " ")
