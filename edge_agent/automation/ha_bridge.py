"""The agent's side of Home Assistant: announces the device (MQTT discovery) on every connect,
on HA's birth message and when rules, cameras or the model change; takes prompts from HA's
`text` entity through the intake and publishes the answer, retained, for HA's sensor."""

from __future__ import annotations

from typing import Callable

from edge_agent import __version__
from edge_agent.errors import AgentError, BadRequest, Busy
from edge_agent.automation.homeassistant import components, discovery_payload, discovery_topic, removal_payload, rule_entity
from edge_agent.log import get_logger
from edge_agent.mqtt import Incoming
from edge_agent.protocol import Topics, encode, error_payload
from edge_agent.settings.model import Settings
from edge_agent.settings.watch import rule_response_format
from edge_agent.work.snapshot import Current, Snapshot

# submit(fields, on_done, background=..., trusted=...) -> accepted: the intake's door for work
Submit = Callable[..., bool]

log = get_logger("homeassistant")
BIRTH = b"online"
MAX_PROMPT_BYTES = 1024  # HA's text entity holds at most 255 characters


def birth_topic(settings: Settings) -> str:
    return f"{settings.homeassistant.discovery_prefix}/status"


def subscriptions(settings: Settings, topics: Topics) -> tuple[str, ...]:
    """What the broker link subscribes for Home Assistant (nothing when it is off)."""
    if not settings.homeassistant.enabled:
        return ()
    return birth_topic(settings), topics.ha_prompt


class HomeAssistantBridge:
    def __init__(self, current: Current, submit: Submit) -> None:
        self._current = current  # the settings snapshot: read once per message or announcement
        self._submit = submit
        self._previous: dict[str, str] = {}  # component id -> platform, as last announced
        self._announced_topic: str | None = None

    def take_if_mine(self, incoming: Incoming) -> bool:
        """HA's birth message or a prompt from its text entity (network thread); False: not ours."""
        snapshot = self._current()
        settings = snapshot.settings
        if not settings.homeassistant.enabled or incoming.topic not in subscriptions(settings, snapshot.topics):
            return False
        snapshot.link.ack(incoming)
        if incoming.topic == birth_topic(settings):
            if incoming.payload.strip() == BIRTH:
                log.info("homeassistant.birth")
                self.announce()
            return True
        self._prompt(incoming.payload, snapshot)
        return True

    # --- discovery -----------------------------------------------------------------------
    def announce(self) -> None:
        """Publish the device's discovery document (retained); when HA is turned off, remove
        the device that was announced."""
        snapshot = self._current()
        settings, link = snapshot.settings, snapshot.link
        if not settings.homeassistant.enabled:
            if self._announced_topic is not None:
                link.publish(self._announced_topic, removal_payload(), retain=True)
                log.info("homeassistant.removed", topic=self._announced_topic)
                self._announced_topic, self._previous = None, {}
            return
        try:
            self._announce(snapshot)
        except Exception:  # noqa: BLE001 - discovery must never take the agent down
            log.exception("homeassistant.announce_failed")

    def _announce(self, snapshot: Snapshot) -> None:
        settings, link = snapshot.settings, snapshot.link
        topic = discovery_topic(settings.homeassistant.discovery_prefix, settings.device_id)
        if self._announced_topic not in (None, topic):  # the prefix or device id changed
            link.publish(self._announced_topic, removal_payload(), retain=True)
            self._previous = {}
        payload = discovery_payload(
            snapshot.topics, device_id=settings.device_id, version=__version__, model=snapshot.handler.engine.name,
            cameras_with_motion=[name for name, cam in settings.cameras.items() if cam.motion.enabled],
            rules=[rule_entity(name, rule.change_key, rule_response_format(rule, settings), rule.snapshot)
                   for name, rule in settings.watch.items() if rule.enabled],
            zones=settings.motion_zones,
            previous=self._previous)
        link.publish(topic, encode(payload), retain=True)
        self._announced_topic, self._previous = topic, components(payload)
        log.info("homeassistant.announced", topic=topic, components=len(self._previous))

    # --- prompts from the text entity -------------------------------------------------------
    def _prompt(self, payload: bytes, snapshot: Snapshot) -> None:
        topic = snapshot.topics.ha_answer
        # the answer goes out on the link of its time (a reload may have swapped it)
        publish = lambda answer, outcome: self._current().link.publish(topic, answer, retain=True)  # noqa: E731
        try:
            if len(payload) > MAX_PROMPT_BYTES:
                raise ValueError(f"the prompt is {len(payload)} bytes; the limit is {MAX_PROMPT_BYTES}")
            text = payload.decode("utf-8")
        except (UnicodeDecodeError, ValueError) as exc:
            reason = "the prompt is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            publish(*_refusal(BadRequest(reason)))
            return
        if not self._submit({"prompt": text}, publish, background=False, trusted=False):
            publish(*_refusal(Busy("the agent is busy or stopping; try again")))


def _refusal(exc: AgentError) -> tuple[bytes, str]:
    """A prompt not run: its error answer, and the outcome it counts as."""
    return error_payload(None, exc.code, exc.message), exc.code.value
