"""Watch rules: look at a camera on a schedule or when it moves, ask a fixed question, publish
the answer as retained state (only when it changed, unless the rule says always).

A rule run is background work that enters through the intake like any request (the same parser,
the same engine), in the background lane: it waits behind every request and never makes one
`busy`. A rule whose previous run is still going is skipped, counted. Runs are greedy (no
sampling field is sent), so unchanged frames give unchanged answers.

A rule on a zone runs on that zone's motion, and with `crop` the model sees the zone's box cut
from the full-resolution frame. When a rule publishes, the JPEG the model saw goes out retained on
its snapshot topic (raw bytes, bounded by `snapshot_max_bytes`), and its id and time are in the
state and the event.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from edge_agent.health.status import utc_iso
from edge_agent.log import get_logger
from edge_agent.protocol import encode
from edge_agent.protocol.history import HistoryEvent
from edge_agent.settings.model import Settings
from edge_agent.settings.watch import WatchRuleSettings
from edge_agent.settings.zones import Box, crop_box

log = get_logger("watch")
TICK_S = 0.1  # how often schedules and motion triggers are looked at
RUN_TIMEOUT_S = 300.0  # a run not answered by then is answered `timeout` (a camera may be slow)
_NOTHING = object()  # no value published yet

# submit(fields, on_done, background=..., trusted=..., timeout_s=...) -> accepted
Submit = Callable[..., bool]
Publish = Callable[..., None]  # (topic, payload, retain, content_type=None)
SNAPSHOT_TYPE = "image/jpeg"
FitJpeg = Callable[[bytes, int], bytes]  # (jpeg, max_bytes) -> a JPEG that fits (cameras/images.py)
Record = Callable[[HistoryEvent, "bytes | None"], None]  # a published state and its snapshot, for the history


def rule_fields(name: str, rule: WatchRuleSettings, crop: Box | None = None,
                with_frame: bool = False) -> dict[str, Any]:
    """The request a rule run makes (also what `edge-agent watch run` sends, without the trusted
    `crop` and the frame). `with_frame`: the answer carries the JPEG the model saw (the snapshot)."""
    fields: dict[str, Any] = {"id": f"watch-{name}-{uuid.uuid4().hex[:12]}", "camera": rule.camera}
    if crop is not None:
        fields["crop"] = list(crop)
    if with_frame:
        fields["include_frame"] = True
    if rule.template is not None:
        fields["template"] = rule.template
        if rule.vars:
            fields["vars"] = dict(rule.vars)
    else:
        fields["prompt"] = rule.prompt
        if rule.system is not None:
            fields["system"] = rule.system
    if rule.response_format is not None:
        fields["response_format"] = rule.response_format
    if rule.max_tokens is not None:
        fields["max_tokens"] = rule.max_tokens
    return fields


def take_snapshot(answer: dict[str, Any]) -> tuple[bytes | None, dict[str, Any] | None]:
    """Takes the frames' JPEGs out of a run's answer (they never go into the published state) and
    returns the first one, the picture the model saw, with its id (the run's request id) and time
    (the frame's capture); (None, None) when the answer has none."""
    jpeg, info = None, None
    for frame in answer.get("frames") or []:
        text = frame.pop("jpeg_base64", None)
        if text is None or jpeg is not None:
            continue
        try:
            jpeg = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            continue
        info = {"id": answer.get("id"), "at": frame.get("captured_at")}
    return jpeg, info


def answer_value(answer: Mapping[str, Any]) -> Any:
    """What a run's answer says: its JSON value when it has one, else its text."""
    return answer["json"] if "json" in answer else answer.get("text")


def change_value(value: Any, change_key: tuple[str, ...]) -> Any:
    """The part of a value that counts as a change: the change_key fields of a JSON object."""
    if not change_key or not isinstance(value, dict):
        return value
    return {key: value.get(key) for key in change_key}


@dataclass
class _Rule:
    name: str
    settings: WatchRuleSettings
    crop: Box | None = None  # the zone's box, when the rule crops
    next_at: float | None = None  # the schedule's next run (monotonic)
    started_at: float | None = None  # the last run's start (cooldown counts from it)
    running: bool = False
    triggered: bool = False  # motion asked for a run
    published_key: Any = _NOTHING
    published_value: Any = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("runs", "published", "unchanged", "skipped_running", "skipped_cooldown", "failed"), 0))
    last_at: str | None = None
    last_error: str | None = None


class Watcher:
    def __init__(self, submit: Submit, publish: Publish, topics: Callable[[], Any], *, fit_jpeg: FitJpeg,
                 record: Record, clock: Callable[[], float] = time.monotonic) -> None:
        self._submit = submit
        self._fit_jpeg = fit_jpeg  # a snapshot within its size (re-encoded smaller), or raises
        self._publish = publish
        self._record = record  # every published state goes to the history (never waits)
        self._topics = topics  # the current Topics (a reload may change the prefix)
        self._clock = clock
        self._lock = threading.Lock()
        self._rules: dict[str, _Rule] = {}
        self._moving: set[tuple[str, str | None]] = set()  # (camera, zone) heard ON, not OFF since
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def configure(self, settings: Settings) -> None:
        """Take the rules of a snapshot: unchanged rules keep their state; a changed rule starts
        over (its next run publishes); a removed or disabled one loses its retained state."""
        now = self._clock()
        with self._lock:
            rules: dict[str, _Rule] = {}
            for name, rule in settings.watch.items():
                old = self._rules.get(name)
                if not rule.enabled:
                    continue
                crop = _crop_of(rule, settings)
                if old is not None and old.settings == rule and old.crop == crop:
                    rules[name] = old
                    continue
                rules[name] = _Rule(name, rule, crop, next_at=now if rule.every_s is not None else None,
                                    # motion that began before the rule was taken (at start, the
                                    # model loads meanwhile) would never trigger it while it lasts
                                    triggered=rule.on_motion and (rule.camera, rule.zone) in self._moving)
            removed = [name for name in self._rules if name not in rules]
            unpictured = [name for name, old in self._rules.items()
                          if old.settings.snapshot and (name in removed or not rules[name].settings.snapshot)]
            self._rules = rules
        topics = self._topics()
        for name in removed:
            self._publish(topics.watch(name), b"", True)  # clears the retained state
        for name in unpictured:
            self._publish(topics.watch_snapshot(name), b"", True)
        log.info("watch.configured", rules=sorted(rules), removed=removed)
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # --- triggers ------------------------------------------------------------------------
    def on_motion(self, camera: str, state: str, zone: str | None = None) -> None:
        """From a capture thread: motion turning ON triggers the camera's on_motion rules, those
        without a zone on the camera's motion, those on a zone on that zone's."""
        with self._lock:
            if state != "ON":
                self._moving.discard((camera, zone))
                return
            self._moving.add((camera, zone))
            for rule in self._rules.values():
                s = rule.settings
                if s.on_motion and s.camera == camera and s.zone == zone:
                    rule.triggered = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the schedule outlives any one surprise
                log.exception("watch.tick_failed")
            self._wake.wait(TICK_S)
            self._wake.clear()

    def _tick(self) -> None:
        now = self._clock()
        due: list[tuple[_Rule, str]] = []
        with self._lock:
            for rule in self._rules.values():
                scheduled = rule.next_at is not None and now >= rule.next_at
                if not (scheduled or rule.triggered):
                    continue
                reason = "motion" if rule.triggered else "schedule"
                rule.triggered = False
                if scheduled:
                    rule.next_at = now + (rule.settings.every_s or 0)
                if self._skip(rule, now, reason):
                    continue
                rule.running, rule.started_at = True, now
                rule.counts["runs"] += 1
                due.append((rule, reason))
        for rule, reason in due:
            self._start_run(rule, reason)

    def _skip(self, rule: _Rule, now: float, reason: str) -> bool:
        if rule.running:
            rule.counts["skipped_running"] += 1
            log.info("watch.skipped", rule=rule.name, why="running", trigger=reason)
            return True
        cooldown = rule.settings.cooldown_s
        if rule.started_at is not None and now - rule.started_at < cooldown:
            rule.counts["skipped_cooldown"] += 1
            if reason == "schedule" and rule.next_at is not None:  # run as soon as it is over
                rule.next_at = max(rule.next_at, rule.started_at + cooldown)
            return True
        return False

    def _start_run(self, rule: _Rule, trigger: str) -> None:
        done = lambda payload, outcome: self._finished(rule, trigger, payload, outcome)  # noqa: E731
        fields = rule_fields(rule.name, rule.settings, rule.crop, with_frame=rule.settings.snapshot)
        log.info("watch.run", rule=rule.name, trigger=trigger, request_id=fields["id"])
        try:
            accepted = self._submit(fields, done, background=True, trusted=True, timeout_s=RUN_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a failed submit must not leave the rule "running"
            log.exception("watch.submit_failed", rule=rule.name)
            accepted = False
        if not accepted:
            with self._lock:
                rule.running = False
                rule.counts["skipped_running"] += 1
            log.info("watch.skipped", rule=rule.name, why="not_accepted")

    # --- results -------------------------------------------------------------------------
    def _finished(self, rule: _Rule, trigger: str, payload: bytes, outcome: str) -> None:
        answer = json.loads(payload)
        jpeg, picture = take_snapshot(answer)
        wall = time.time()
        at = utc_iso(wall)
        with self._lock:
            rule.running = False
            rule.last_at = at
            if not answer.get("ok"):
                rule.counts["failed"] += 1
                rule.last_error = f"{answer['error']['code']}: {answer['error']['message']}"
                log.warning("watch.failed", rule=rule.name, code=answer["error"]["code"],
                            reason=answer["error"]["message"])
                return
            rule.last_error = None
            value = answer_value(answer)
            key = change_value(value, rule.settings.change_key)
            changed = rule.published_key is _NOTHING or key != rule.published_key
            previous = None if rule.published_key is _NOTHING else rule.published_value
            if not changed and rule.settings.publish == "change":
                rule.counts["unchanged"] += 1
                log.info("watch.unchanged", rule=rule.name)
                return
            rule.published_key, rule.published_value = key, value
            rule.counts["published"] += 1
            current = self._rules.get(rule.name) is rule  # a reload may have replaced it meanwhile
        if not current:
            return
        topics = self._topics()
        jpeg, snapshot = self._publish_snapshot(rule, jpeg, picture, topics)
        state = {"rule": rule.name, "at": at, "trigger": trigger, "text": answer.get("text"), "changed": changed,
                 "previous": previous, "frames": answer.get("frames", []), "timings": answer.get("timings"),
                 "snapshot": snapshot}
        if "json" in answer:
            state["json"] = answer["json"]
        self._publish(topics.watch(rule.name), encode(state), True)
        if changed:
            key_name = "json" if "json" in answer else "text"
            self._publish(topics.events, encode({"rule": rule.name, "at": at, key_name: value,
                                                 "previous": previous, "snapshot": snapshot}), False)
        log.info("watch.published", rule=rule.name, changed=changed)
        self._keep(HistoryEvent(answer.get("id") or "", rule.name, rule.settings.camera, wall, trigger,
                                answer.get("text"), answer.get("json"), "json" in answer, changed, jpeg is not None),
                   jpeg)

    def _keep(self, event: HistoryEvent, jpeg: bytes | None) -> None:
        """After the state is out: the history may fail or be full, the rule goes on."""
        try:
            self._record(event, jpeg)
        except Exception:  # noqa: BLE001 - the history never costs a rule its state
            log.exception("history.record_failed", rule=event.rule)

    def _publish_snapshot(self, rule: _Rule, jpeg: bytes | None, picture: dict[str, Any] | None,
                          topics: Any) -> tuple[bytes | None, dict[str, Any] | None]:
        """The picture out, retained, within the rule's size: the bytes published (the history
        keeps the same) and what the state says of them; (None, None): no snapshot."""
        if jpeg is None or picture is None or not rule.settings.snapshot:
            return None, None
        try:
            jpeg = self._fit_jpeg(jpeg, rule.settings.snapshot_max_bytes)
        except Exception as exc:  # noqa: BLE001 - no picture is better than no state
            log.warning("watch.snapshot_failed", rule=rule.name, reason=str(exc))
            return None, None
        topic = topics.watch_snapshot(rule.name)
        self._publish(topic, jpeg, True, content_type=SNAPSHOT_TYPE)
        return jpeg, {**picture, "topic": topic, "bytes": len(jpeg)}

    # --- what the status shows -------------------------------------------------------------
    def info(self) -> dict[str, dict[str, Any]]:
        now, wall = self._clock(), time.time()
        with self._lock:
            return {name: {**rule.counts, "running": rule.running, "last_at": rule.last_at,
                           "last_error": rule.last_error, **_next_run(rule.next_at, now, wall)}
                    for name, rule in self._rules.items()}


def _crop_of(rule: WatchRuleSettings, settings: Settings) -> Box | None:
    """The box a cropping rule's runs cut: its zone's bounding box plus a margin."""
    camera = settings.cameras.get(rule.camera)
    if not rule.crop or rule.zone is None or camera is None or rule.zone not in camera.zones:
        return None
    return crop_box(camera.zones[rule.zone].polygon)


def _next_run(next_at: float | None, now: float, wall: float) -> dict[str, Any]:
    """The schedule's next run, in seconds from now and as a UTC time (null: motion only)."""
    if next_at is None:
        return {"next_in_s": None, "next_at": None}
    left = max(0.0, next_at - now)
    return {"next_in_s": round(left, 1), "next_at": utc_iso(wall + left, "seconds")}
