"""Wires the parts. Start order lives in `Agent.start`, shutdown in reverse in `Agent.stop`, and
a new settings snapshot is applied by `Agent.apply`: the parts that changed are built first,
then the whole `Snapshot` is swapped in one assignment. Nothing below `daemon/` receives the
`Agent`: each part gets the functions it needs and reads the snapshot through `current()`."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from edge_agent import log as logging_setup
from edge_agent.automation.ha_bridge import HomeAssistantBridge, subscriptions as ha_subscriptions
from edge_agent.automation.watch import Watcher
from edge_agent.cameras.camera_set import CameraSet
from edge_agent.daemon import views
from edge_agent.daemon.parts import history_bounds, make_engine, open_store, request_limits
from edge_agent.daemon.reload import (CAMERAS, HOME_ASSISTANT, LOGGING, METRICS, MODEL, MQTT, OVERFLOW, WATCH,
                                      changed_parts)
from edge_agent.delivery.history import History
from edge_agent.delivery.outbox import Delivery
from edge_agent.errors import Unavailable
from edge_agent.health.listener import MetricsListener
from edge_agent.health.metrics import Live, Metrics
from edge_agent.health.reports import Reports
from edge_agent.health.status import StatusBoard
from edge_agent.health.stats import Stats
from edge_agent.inference.types import Generation
from edge_agent.log import get_logger
from edge_agent.mqtt import BrokerLink, Incoming
from edge_agent.protocol import Topics
from edge_agent.protocol.history import HistoryEvent
from edge_agent.settings.model import Settings
from edge_agent.work.frames import ImageGatherer
from edge_agent.work.handler import Inference, RequestHandler
from edge_agent.work.inflight import InFlight
from edge_agent.work.intake import Intake
from edge_agent.work.jobs import run
from edge_agent.work.lanes import Scheduler
from edge_agent.work.overflow import Overflow
from edge_agent.work.snapshot import Snapshot

log = get_logger("app")
# The MQTT network thread loops every 0.2 s; a connect attempt may block up to paho's 5 s
# connect timeout plus name resolution. Silent longer than this (plus the reconnect back-off
# while disconnected) means it is wedged, and the systemd watchdog pings stop.
MQTT_LOOP_STALE_S = 10.0
OLD_ENGINE_POLL_S = 0.1


class Agent:
    def __init__(self, settings: Settings) -> None:
        self._stopping = threading.Event()
        self.status = StatusBoard(settings.device_id)
        self.metrics = Metrics()
        self.stats = Stats(metrics=self.metrics)
        # Bound first: a port in use is a settings error before anything else starts.
        self.metrics_listener = self._new_metrics_listener(settings)
        self.cameras = CameraSet(settings.cameras)
        self.in_flight = InFlight()
        self.scheduler = Scheduler(settings.limits.queue_size, run)
        self.delivery = Delivery(open_store(settings), lambda: self.snapshot.link,
                                 lambda: self.snapshot.settings.delivery.answer_qos)
        topics = Topics(settings.mqtt.topic_prefix, settings.device_id)
        self.snapshot = Snapshot(settings, topics, request_limits(settings), self._new_link(settings, topics),
                                 self._new_handler(settings, make_engine(settings)), self._new_overflow(settings))
        # After the snapshot: the history's writer thread reads its bounds from it at once.
        self.history = History(settings.state_dir, lambda: history_bounds(self.snapshot.settings))
        self.intake = Intake(self.current, self.scheduler, self.delivery, self.in_flight, self.stats,
                             self._stopping.is_set, history=self.history)
        self.reports = Reports(self.current, self.status, self.stats, self.cameras.info, self.work_info,
                               self.live_status)
        self.watcher = Watcher(self.intake.submit_fields, self._publish_retained, lambda: self.snapshot.topics,
                               record=self._record, fit_jpeg=_fit_jpeg)
        self.home_assistant = HomeAssistantBridge(self.current, self.intake.submit_fields)
        self.intake.add_side_door(self.home_assistant.take_if_mine)
        self.cameras.set_motion_listener(self._on_motion)
        self.metrics.read_live(self._live_metrics)

    def current(self) -> Snapshot:
        return self.snapshot

    # Read-only views of the snapshot, for the daemon's main loop and tests.
    settings = property(lambda self: self.snapshot.settings)
    topics = property(lambda self: self.snapshot.topics)
    limits = property(lambda self: self.snapshot.limits)
    link = property(lambda self: self.snapshot.link)
    engine = property(lambda self: self.snapshot.handler.engine)
    overflow = property(lambda self: self.snapshot.overflow)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Broker first (so `starting` is visible), cameras (they open in the background),
        then model, warm-up, worker, subscription."""
        snapshot = self.snapshot
        if self.metrics_listener is not None:  # /healthz says `starting` while the model loads
            self.metrics_listener.start()
        snapshot.link.start()
        self.cameras.start_all()
        if snapshot.overflow is not None:
            snapshot.overflow.start()
            if "unloaded" in snapshot.settings.overflow.when:  # the overflow answers while the model loads
                self._take_requests()
        engine = snapshot.handler.engine
        engine.load()
        self._set_status("starting", model=engine.name, provider=engine.provider,
                         provider_reason=engine.provider_reason, **views.batching_status(snapshot))
        _warm_up(engine, snapshot.settings)
        self.scheduler.set_workers(views.max_batch(snapshot))
        self.scheduler.start()
        self.snapshot = dataclasses.replace(snapshot, loaded=True)
        self._take_requests()
        self.watcher.configure(snapshot.settings)
        self.watcher.start()
        self._set_status("ready", **self.live_status())
        self.home_assistant.announce()
        log.info("agent.ready", request_topic=snapshot.topics.request)

    def _take_requests(self) -> None:
        self.snapshot.link.accept_requests(True)
        self.intake.open_door()  # first what the broker session held for us while we were away

    def stop(self) -> None:
        """Reverse order: stop taking requests, finish or refuse queued work, say offline."""
        self._stopping.set()
        self._set_status("stopping")
        snapshot = self.snapshot
        snapshot.link.accept_requests(False, keep_session=True)
        self.watcher.stop()
        for job in self.scheduler.stop(snapshot.settings.shutdown_grace_s):
            job.refuse(Unavailable("the agent is stopping"))
        if snapshot.overflow is not None:
            for job in snapshot.overflow.stop(snapshot.settings.shutdown_grace_s):
                job.refuse(Unavailable("the agent is stopping"))
        self.cameras.stop_all()
        snapshot.handler.engine.close()
        offline = self.status.set("offline")
        self.delivery.close()  # answers still queued are stored, acknowledged and published first
        self.history.close(snapshot.settings.shutdown_grace_s)
        if not snapshot.link.publish_and_wait(snapshot.topics.status, offline, retain=True):
            log.warning("status.offline_not_acknowledged")
        snapshot.link.stop()
        if self.metrics_listener is not None:
            self.metrics_listener.stop()
        log.info("agent.stopped", outcomes=self.stats.requests.outcomes())

    def apply(self, new: Settings) -> set[str]:
        """Swap in a validated snapshot, restarting only what changed. What can fail (a new
        broker link's set-up, loading a new model) happens before anything is swapped, so a
        failure leaves the running agent untouched."""
        old = self.snapshot
        parts = changed_parts(old.settings, new)
        link, topics = old.link, old.topics
        if MQTT in parts:
            topics = Topics(new.mqtt.topic_prefix, new.device_id)
            link = self._new_link(new, topics)
        engine = old.handler.engine
        if MODEL in parts:
            engine = make_engine(new)
            try:
                engine.load()  # requests keep running on the old model meanwhile
                _warm_up(engine, new)
            except BaseException:
                engine.close()
                raise
        engine.longest_s = new.limits.max_timeout_s
        overflow = old.overflow
        if OVERFLOW in parts:
            overflow = self._new_overflow(new)
            if overflow is not None:
                overflow.start()
        if METRICS in parts:
            try:
                self.move_metrics_listener(new)
            except BaseException:
                if engine is not old.handler.engine:
                    engine.close()
                if overflow is not old.overflow and overflow is not None:
                    overflow.stop(0)
                raise
        if link is not old.link:
            self._leave_link(old)
        # The one swap: a request taken from here on reads the new snapshot; a job already
        # taken keeps the runner (handler, engine, token cap) of the snapshot it came under.
        self.snapshot = Snapshot(new, topics, request_limits(new), link, self._new_handler(new, engine),
                                 overflow, loaded=old.loaded)
        if link is not old.link:
            link.start()
            link.accept_requests(not self._stopping.is_set())
            log.info("mqtt.switched", old=link_host(old.settings), new=link_host(new))
        self.scheduler.resize(new.limits.queue_size)
        self.scheduler.set_workers(views.max_batch(self.snapshot))
        if engine is not old.handler.engine:
            self._retire_engine(old.handler.engine)
            self.status.set(self.status.state, model=engine.name, provider=engine.provider,
                            provider_reason=engine.provider_reason, **views.batching_status(self.snapshot))
        if overflow is not old.overflow and old.overflow is not None:
            self._retire_overflow(old.overflow, new.shutdown_grace_s)
        if CAMERAS in parts:
            self.cameras.reconfigure(new.cameras)
            self._clear_gone_zones(old.settings, new)
        if WATCH in parts or CAMERAS in parts:
            self.watcher.configure(new)
        if WATCH in parts or CAMERAS in parts or HOME_ASSISTANT in parts or MODEL in parts:
            self.home_assistant.announce()
        if LOGGING in parts:
            logging_setup.configure(new.log_level, new.log_format)
        if old.settings.history != new.history:
            self.history.rebound()
        return parts

    def move_metrics_listener(self, new: Settings) -> None:
        """Moved, started or stopped by a reload; a port in use keeps the old one (ConfigError)."""
        old = self.metrics_listener
        if old is not None:
            old.stop()  # first: the new address may be the same port on another host
        try:
            self.metrics_listener = self._new_metrics_listener(new)
        except Exception:
            self.metrics_listener = self._new_metrics_listener(self.snapshot.settings) if old else None
            if self.metrics_listener is not None:
                self.metrics_listener.start()
            raise
        if self.metrics_listener is not None:
            self.metrics_listener.start()

    def _retire_engine(self, old: Inference) -> None:
        """The old model ends once no job taken under it is queued or running any more."""
        def close() -> None:
            while any(getattr(job.runner, "engine", None) is old for job in self.scheduler.jobs()):
                time.sleep(OLD_ENGINE_POLL_S)
            old.close()
        threading.Thread(target=close, name="engine-close", daemon=True).start()

    @staticmethod
    def _retire_overflow(old: Overflow, grace_s: float) -> None:
        """The new server takes what overflows from now on; the old one finishes its requests."""
        def finish() -> None:
            for job in old.stop(grace_s):
                job.refuse(Unavailable("the overflow server was replaced; send it again"))
        threading.Thread(target=finish, name="overflow-close", daemon=True).start()

    def _leave_link(self, old: Snapshot) -> None:
        """Leave the old broker (saying offline there) before joining the new one: with the
        same client id on the same broker the two links would take the session from each other."""
        old.link.accept_requests(False)
        old.link.publish_and_wait(old.topics.status, self.status.offline_payload(), retain=True)
        old.link.stop()

    def report_config_error(self, problems: list[str] | None) -> None:
        """Shown in the retained status until a good file arrives."""
        self._set_status(self.status.state, config_error=problems)

    def report_degraded(self, error: str) -> None:
        """Queued even while disconnected: a start failure's error must reach the broker before
        the process exits (stop() waits for the connection to say offline)."""
        snapshot = self.snapshot
        snapshot.link.publish(snapshot.topics.status, self.status.set("degraded", error=error), retain=True)

    def healthy(self) -> bool:
        return self.snapshot.link.loop_alive() and self.watcher.alive() and self.scheduler.alive()

    def serving(self) -> bool:
        """Model loaded and warmed up, worker running, subscribed, broker connected: what
        READY=1 tells systemd."""
        return self.status.state == "ready" and self.snapshot.link.connected

    def making_progress(self, now: float | None = None) -> bool:
        """What a systemd watchdog ping vouches for: the MQTT network thread looped lately and
        the inference worker is idle and beating, or within its current job's budget."""
        now = time.monotonic() if now is None else now
        snapshot = self.snapshot
        link, settings = snapshot.link, snapshot.settings
        stale_s = MQTT_LOOP_STALE_S + (0.0 if link.connected else settings.mqtt.reconnect_max_s)
        if not link.loop_alive() or now - link.last_loop_at > stale_s:
            return False
        return self.scheduler.progressing(settings.limits.max_timeout_s, now)

    # --- what comes and goes on the broker (network thread: never waits) ---------------------
    def _publish_retained(self, topic: str, payload: bytes, retain: bool = True,
                          content_type: str | None = None) -> None:
        """Rule state, events, snapshots (`content_type` image/jpeg), motion: paho queues them
        while the broker is away (QoS 1)."""
        typed = {} if content_type is None else {"content_type": content_type}
        self.snapshot.link.publish(topic, payload, retain=retain, **typed)

    def _record(self, event: HistoryEvent, jpeg: bytes | None) -> None:
        """A rule's published state into the history, unless [history] is off (a reload may say so)."""
        if self.snapshot.settings.history.enabled:
            self.history.record(event, jpeg)

    def _on_motion(self, camera: str, state: str, zone: str | None = None) -> None:
        """From a capture thread: publish the retained state (the camera's or a zone's), let the
        rules know."""
        snapshot = self.snapshot
        topic = snapshot.topics.motion(camera) if zone is None else snapshot.topics.zone_motion(camera, zone)
        snapshot.link.publish(topic, state.encode(), retain=True, content_type="text/plain; charset=utf-8")
        self.watcher.on_motion(camera, state, zone)

    def _clear_gone_zones(self, old: Settings, new: Settings) -> None:
        """A zone removed (or its camera's motion off) loses its retained motion state."""
        for camera, zone in sorted(set(old.motion_zones) - set(new.motion_zones)):
            self._publish_retained(self.snapshot.topics.zone_motion(camera, zone), b"")

    def _on_connected(self) -> None:
        self.reports.publish_status()
        self.delivery.replay()
        self.home_assistant.announce()

    # --- parts -------------------------------------------------------------------------------
    def _new_link(self, settings: Settings, topics: Topics) -> BrokerLink:
        return BrokerLink(settings.mqtt, settings.client_id, request_topic=topics.request,
                          will_topic=topics.status, will_payload=self.status.offline_payload,
                          on_message=self._on_message, on_connected=self._on_connected,
                          receive_maximum=settings.mqtt.receive_maximum or settings.limits.queue_size + 32,
                          shared_topic=topics.shared_fleet_request(settings.mqtt.shared_group)
                          if settings.mqtt.shared_group else None,
                          control_topics=(topics.cancel,) + ((topics.fleet_cancel,) if settings.mqtt.shared_group else ())
                          + ha_subscriptions(settings, topics))

    def _on_message(self, incoming: Incoming) -> None:
        self.intake.take(incoming)

    def _new_overflow(self, settings: Settings) -> Overflow | None:
        if not settings.overflow.base_url:
            return None
        return Overflow(settings.overflow, lambda server: self._new_handler(settings, server))

    def _new_handler(self, settings: Settings, engine: Inference) -> RequestHandler:
        return RequestHandler(engine, settings.model.max_new_tokens, ImageGatherer(self.cameras, settings.images),
                              on_generated=self._generated, stream_interval_s=settings.stream.interval_ms / 1000)

    def _generated(self, done: Generation, queue_s: float) -> None:
        self.stats.requests.decoded(done.tokens_per_s)
        self.metrics.generated(queue_s, None if done.ttft_ms is None else done.ttft_ms / 1000,
                               done.generate_ms / 1000, done.prompt_tokens, done.completion_tokens,
                               done.cached_tokens)

    def _new_metrics_listener(self, settings: Settings) -> MetricsListener | None:
        if not settings.metrics.listen:
            return None
        return MetricsListener(settings.metrics.listen, self.metrics.scrape, self._health)

    def _health(self) -> tuple[bool, str]:
        """What /healthz says: healthy when ready and its loops are alive."""
        state = self.status.state
        return state == "ready" and self.healthy() and self.snapshot.link.connected, state

    def _live_metrics(self) -> Live:
        return views.live_metrics(self)

    # --- status ----------------------------------------------------------------------------
    def _set_status(self, state: str, **fields: object) -> None:
        self.reports.set_status(state, **fields)

    def refresh_status(self, force: bool = False) -> None:
        self.reports.refresh_status(force)

    def publish_stats(self) -> None:
        self.reports.publish_stats()

    def live_status(self, cameras: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The status fields that change while the agent runs (`cameras`: already read)."""
        return {"cameras": self.cameras.info() if cameras is None else cameras, **self._parts_info(self.snapshot)}

    def work_info(self) -> dict[str, Any]:
        return views.work_info(self)

    def _parts_info(self, snapshot: Snapshot) -> dict[str, Any]:
        return views.parts_info(self, snapshot)


def _fit_jpeg(jpeg: bytes, max_bytes: int) -> bytes:
    """A rule's snapshot within its size; OpenCV loads here, not with the daemon (frames did already)."""
    from edge_agent.cameras.images import fit_jpeg

    return fit_jpeg(jpeg, max_bytes)


def _warm_up(engine: Any, settings: Settings) -> None:
    if settings.model.warmup:
        warm = engine.warm_up()
        log.info("model.warmed_up", model=engine.name, ms=round(warm.generate_ms, 1))


def link_host(settings: Settings) -> str:
    return f"{settings.mqtt.host}:{settings.mqtt.port}"
