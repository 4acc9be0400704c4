"""What the agent says about itself: the retained status document and the periodic stats.
Health is data: published, not only logged."""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from edge_agent.health.status import StatusBoard
from edge_agent.log import get_logger
from edge_agent.protocol import encode
from edge_agent.health.stats import Stats

log = get_logger("app")
STATUS_REFRESH_S = 30.0


class Current(Protocol):
    """The settings snapshot, as the reports read it: read once per report."""

    @property
    def link(self) -> Any: ...

    @property
    def topics(self) -> Any: ...

    @property
    def settings(self) -> Any: ...


class Reports:
    def __init__(self, current: Callable[[], Current], status: StatusBoard, stats: Stats,
                 cameras_info: Callable[[], dict[str, dict[str, Any]]], work_info: Callable[[], dict[str, Any]],
                 live_status: Callable[[dict[str, dict[str, Any]]], dict[str, Any]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._current = current
        self._cameras_info = cameras_info
        self._work_info = work_info
        self._live_status = live_status
        self.status = status
        self.stats = stats
        self._clock = clock
        self._status_at = 0.0
        self._stats_at = clock()
        self._camera_states: dict[str, tuple[Any, Any]] = {}

    def set_status(self, state: str, **fields: object) -> None:
        self.status.set(state, **fields)
        self.publish_status()

    def refresh_status(self, force: bool = False) -> None:
        """Republish when a camera changed state or motion, or every STATUS_REFRESH_S for fps,
        ages and the watch rules' counts."""
        cameras = self._cameras_info()
        states = {name: (info["state"], info.get("motion")) for name, info in cameras.items()}
        now = self._clock()
        if force or states != self._camera_states or now - self._status_at >= STATUS_REFRESH_S:
            self._camera_states = states
            self.set_status(self.status.state, **self._live_status(cameras))

    def publish_status(self) -> None:
        self._status_at = self._clock()
        # Only while connected; every connect publishes the current status (Agent._on_connected),
        # after subscribing. Sent while connecting, paho puts it right behind CONNECT, before
        # the request subscription: a request sent on seeing `ready` was lost. Queued while
        # disconnected, it went out after the current one: a ready agent's retained status
        # said `starting`.
        snapshot = self._current()
        if snapshot.link.connected:
            snapshot.link.publish(snapshot.topics.status, self.status.payload(), retain=True)

    def publish_stats(self) -> None:
        """Every `stats_interval_s` (0: never). QoS 0, not retained: a missed one is
        replaced by the next, and none pile up in paho's queue while the broker is away."""
        snapshot = self._current()
        interval, now = snapshot.settings.stats_interval_s, self._clock()
        if interval <= 0 or now - self._stats_at < interval:
            return
        self._stats_at = now
        try:
            work = self._work_info()
            doc = self.stats.document(device_id=snapshot.settings.device_id, cameras=self._cameras_info(),
                                      queue_depth=work["queue_depth"], busy_rejected=work["busy_rejected"])
            doc.update(in_flight=work["in_flight"], delivery=work["delivery"],
                       inference_restarts=work["inference_restarts"], watch=work["watch"],
                       **{key: work[key] for key in ("remote", "overflow", "fleet", "memory", "history") if work[key]})
        except Exception:  # noqa: BLE001 - stats must never take the daemon down
            log.exception("stats.failed")
            return
        snapshot.link.publish(snapshot.topics.stats, encode(doc), qos=0)
