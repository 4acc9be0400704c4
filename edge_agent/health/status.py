"""Lifecycle state published as retained status: health is data, not only log lines."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any

from edge_agent import __version__
from edge_agent.protocol import encode

STATES = ("starting", "ready", "degraded", "stopping", "offline")


def utc_now() -> str:
    return utc_iso(time.time())


def utc_iso(epoch_s: float, timespec: str = "milliseconds") -> str:
    """`2026-11-30T19:36:02.301Z`: the one format of times in what the agent publishes."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


class StatusBoard:
    """The current status document; thread-safe, as both MQTT and main threads touch it."""

    def __init__(self, device_id: str) -> None:
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"state": "starting", "device_id": device_id,
                                     "version": __version__, "model": None, "provider": None,
                                     "since": utc_now()}

    def set(self, state: str, **fields: Any) -> bytes:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._lock:
            if state != self._doc["state"]:
                self._doc["since"] = utc_now()
            self._doc.update(fields, state=state)
            return encode(self._doc)

    @property
    def state(self) -> str:
        with self._lock:
            return str(self._doc["state"])

    def payload(self) -> bytes:
        with self._lock:
            return encode(self._doc)

    def offline_payload(self) -> bytes:
        """What the last will says if we vanish: the same document, state offline."""
        with self._lock:
            return encode({**self._doc, "state": "offline", "since": utc_now()})
