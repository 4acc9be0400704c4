"""Hot reload: file events (watchdog) and SIGHUP → debounce → new snapshot → what changed.

Editors and config managers write a temp file and rename it over the real one, or write in
several steps: every event on the main file or a conf.d/*.toml restarts a quiet-time timer, and
only when the files have been quiet for `debounce_s` is the new snapshot built. Building and
applying it is the caller's (the daemon's main thread): this module only watches and compares.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from edge_agent.log import get_logger
from edge_agent.settings.model import Settings

log = get_logger("reload")

# What a change needs, from lightest to heaviest. "live": swapped in, nothing restarts.
LIVE, LOGGING, CAMERAS, MQTT, MODEL = "live", "logging", "cameras", "mqtt", "model"
WATCH, HOME_ASSISTANT, OVERFLOW, METRICS = "watch", "homeassistant", "overflow", "metrics"
MODEL_KEYS = ("backend", "path", "provider", "provider_options", "fallback")
LIVE_MQTT_KEYS = ("reply_topic_allow", "fleet_max_hops")
# watchdog 5+ reports a file being opened and closed unwritten (inotify): reading the settings
# to reload them must not count as an edit, or one edit reloads every debounce_s for ever.
READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


def changed_parts(old: Settings, new: Settings) -> set[str]:
    """Which parts of the running daemon a new snapshot touches."""
    parts: set[str] = set()
    if old == new:
        return parts
    old_mqtt, new_mqtt = old.mqtt.model_dump(exclude=set(LIVE_MQTT_KEYS)), new.mqtt.model_dump(exclude=set(LIVE_MQTT_KEYS))
    if old.homeassistant != new.homeassistant:
        # its topics (HA's birth, the prompt entity) are subscribed by the broker link
        parts.update((HOME_ASSISTANT, MQTT))
    if old_mqtt != new_mqtt or old.device_id != new.device_id:
        parts.add(MQTT)
    if any(getattr(old.model, k) != getattr(new.model, k) for k in MODEL_KEYS) or old.inference != new.inference \
            or (new.model.backend == "openai" and old.openai != new.openai):
        parts.add(MODEL)
    if old.overflow != new.overflow:
        parts.add(OVERFLOW)
    if old.metrics != new.metrics:
        parts.add(METRICS)
    if old.cameras != new.cameras:
        parts.add(CAMERAS)
    if old.watch != new.watch:
        parts.add(WATCH)
    if (old.log_level, old.log_format) != (new.log_level, new.log_format):
        parts.add(LOGGING)
    parts.add(LIVE)  # limits, images, token cap, timings: always re-read from the new snapshot
    return parts


class _Events(FileSystemEventHandler):
    def __init__(self, relevant: Callable[[str], bool], poke: Callable[[], None]) -> None:
        self._relevant = relevant
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in READ_ONLY_EVENTS:  # our own reading of the file: not a change
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(p and self._relevant(str(p)) for p in paths):
            self._poke()


class ConfigWatcher:
    """Calls `on_change` once the main file and conf.d/*.toml have been quiet for `debounce_s`."""

    def __init__(self, main: Path, debounce_s: float, on_change: Callable[[], None]) -> None:
        self.main = main.resolve()
        self.dropins = self.main.parent / "conf.d"
        self.debounce_s = debounce_s
        self._on_change = on_change
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._observer: Any = None
        self._handler: _Events | None = None
        self._dropins_watched = False

    def relevant(self, path: str) -> bool:
        candidate = Path(path)
        if candidate in (self.main, self.dropins):  # conf.d itself: it may appear later
            return True
        return (candidate.parent == self.dropins and candidate.suffix == ".toml"
                and not candidate.name.startswith("."))

    def start(self) -> None:
        self._observer = Observer()
        self._handler = _Events(self.relevant, self.poke)
        # The folders, not the files: a rename replaces the file a watch would be attached to.
        self._observer.schedule(self._handler, str(self.main.parent), recursive=False)
        self._watch_dropins()
        self._observer.daemon = True
        self._observer.start()
        log.info("reload.watching", file=str(self.main), dropins=str(self.dropins))

    def _watch_dropins(self) -> None:
        if not self._dropins_watched and self.dropins.is_dir() and self._observer is not None:
            self._observer.schedule(self._handler, str(self.dropins), recursive=False)
            self._dropins_watched = True

    def poke(self) -> None:
        """A relevant event: restart the quiet-time timer."""
        with self._lock:
            self._watch_dropins()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce_s, self._on_change)
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
