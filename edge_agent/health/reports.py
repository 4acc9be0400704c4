"""What the agent says about itself: the retained status document and the periodic stats.
Health is data: published, not only logged."""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from edge_agent.health.service import StatusBoard
from edge_agent.log import get_logger
from edge_agent.protocol import encode
from edge_agent.health.stats import Stats

log = get_logger("app")
STATUS_REFRESH_S = 30.0


class Source(Protocol):
    """The agent, as the reports read it (the current snapshot of each part)."""

    link: Any
    topics: Any
    settings: Any

    def cameras_info(self) -> dict[str, dict[str, Any]]: ...

    def work_info(self) -> dict[str, Any]: ...

    def live_status(self, cameras: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]: ...


class Reports:
    def __init__(self, source: Source, status: StatusBoard, stats: Stats,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
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
        cameras = self._source.cameras_info()
        states = {name: (info["state"], info.get("motion")) for name, info in cameras.items()}
        now = self._clock()
        if force or states != self._camera_states or now - self._status_at >= STATUS_REFRESH_S:
            self._camera_states = states
            self.set_status(self.status.state, **self._source.live_status(cameras))

    def publish_status(self) -> None:
        self._status_at = self._clock()
        # Only while connected; every connect publishes the current status (Agent._on_connected),
        # after subscribing. Sent while connecting, paho puts it right behind CONNECT, before
        # the request subscription: a request sent on seeing `ready` was lost. Queued while
        # disconnected, it went out after the current one: a ready agent's retained status
        # said `starting`.
        link = self._source.link
        if link.connected:
            link.publish(self._source.topics.status, self.status.payload(), retain=True)

    def publish_stats(self) -> None:
        """Every `stats_interval_s` (0: never). QoS 0, not retained: a missed one is
        replaced by the next, and none pile up in paho's queue while the broker is away."""
        interval, now = self._source.settings.stats_interval_s, self._clock()
        if interval <= 0 or now - self._stats_at < interval:
            return
        self._stats_at = now
        try:
            work = self._source.work_info()
            doc = self.stats.document(device_id=self._source.settings.device_id,
                                      cameras=self._source.cameras_info(),
                                      queue_depth=work["queue_depth"], busy_rejected=work["busy_rejected"])
            doc.update(in_flight=work["in_flight"], delivery=work["delivery"],
                       inference_restarts=work["inference_restarts"], watch=work["watch"],
                       **{key: work[key] for key in ("remote", "overflow", "fleet") if work[key]})
        except Exception:  # noqa: BLE001 - stats must never take the daemon down
            log.exception("stats.failed")
            return
        self._source.link.publish(self._source.topics.stats, encode(doc), qos=0)
