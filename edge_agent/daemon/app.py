"""Wires the parts. Start order lives in `Agent.start`, shutdown in reverse in `Agent.stop`,
and a new settings snapshot is applied by `Agent.apply` (only what changed restarts)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from edge_agent import log as logging_setup
from edge_agent.errors import Unavailable
from edge_agent.automation.ha_bridge import HomeAssistantBridge, subscriptions as ha_subscriptions
from edge_agent.work.handler import Engine, RequestHandler
from edge_agent.work.inflight import InFlight
from edge_agent.work.intake import Intake
from edge_agent.work.jobs import Job
from edge_agent.settings.catalog import is_catalog_name, resolve_model_path
from edge_agent.inference import EngineProcess
from edge_agent.inference.openai_client import OpenAIServer
from edge_agent.work.overflow import Overflow
from edge_agent.health.service import StatusBoard
from edge_agent.log import get_logger
from edge_agent.mqtt import BrokerLink, Incoming
from edge_agent.protocol.prompts import PromptTemplate
from edge_agent.protocol import RequestLimits, Topics, chunk_payload, error_payload
from edge_agent.protocol.structured import parse_response_format
from edge_agent.cameras.camera_set import CameraSet
from edge_agent.daemon.reload import CAMERAS, HOME_ASSISTANT, LOGGING, MODEL, MQTT, OVERFLOW, WATCH, changed_parts
from edge_agent.delivery.outbox import Delivery
from edge_agent.health.reports import Reports
from edge_agent.work.lanes import Scheduler
from edge_agent.delivery.store import Store
from edge_agent.settings.model import Settings
from edge_agent.health.stats import Stats
from edge_agent.work.frames import ImageGatherer
from edge_agent.automation.watch import Watcher

log = get_logger("app")
# The MQTT network thread loops every 0.2 s; a connect attempt may block up to paho's 5 s
# connect timeout plus name resolution. Silent longer than this (plus the reconnect back-off
# while disconnected) means it is wedged, and the systemd watchdog pings stop.
MQTT_LOOP_STALE_S = 10.0


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.mqtt.topic_prefix, settings.device_id)
        self.limits = request_limits(settings)
        self.cameras = CameraSet(settings.cameras)
        self.status = StatusBoard(settings.device_id)
        self.stats = Stats()
        self.reports = Reports(self, self.status, self.stats)
        self.engine = make_engine(settings)
        self.overflow = self._new_overflow(settings)
        self.handler: RequestHandler | None = None
        self.scheduler: Scheduler | None = None
        self.store = open_store(settings)
        self.delivery = Delivery(self.store, lambda: self.link, lambda: self.settings.delivery.answer_qos)
        self.link = self._new_link(settings, self.topics)
        self._early_lock = threading.Lock()
        self._early: list[Incoming] | None = []  # delivered before the worker runs; None after
        self._stopping = threading.Event()
        self.in_flight = InFlight()
        self.intake = Intake(self, self.delivery, self.in_flight, self.stats)
        self.watcher = Watcher(self.intake.submit_fields, self._publish_retained, lambda: self.topics)
        self.home_assistant = HomeAssistantBridge(self)
        self.cameras.set_motion_listener(self._on_motion)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Broker first (so `starting` is visible), cameras (they open in the background),
        then model, warm-up, worker, subscription."""
        self.link.start()
        self.cameras.start_all()
        if self.overflow is not None:
            self.overflow.start()
            if "unloaded" in self.settings.overflow.when:  # the overflow answers while the model loads
                self._take_requests()
        self.engine.load()
        self._set_status("starting", model=self.engine.name, provider=self.engine.provider,
                         provider_reason=self.engine.provider_reason, **self._batching_status())
        self._warm_up(self.engine, self.settings)
        self.handler = self._new_handler()
        self.scheduler = Scheduler(self.settings.limits.queue_size, self._process, self._max_batch())
        self.scheduler.start()
        self._take_requests()
        self.watcher.configure(self.settings)
        self.watcher.start()
        self._set_status("ready", **self.live_status())
        self.home_assistant.announce()
        log.info("agent.ready", request_topic=self.topics.request)

    def _take_requests(self) -> None:
        self.link.accept_requests(True)
        with self._early_lock:  # requests the broker session held for us while we were away
            early, self._early = self._early, None
        for incoming in early or []:
            self._on_message(incoming)

    def stop(self) -> None:
        """Reverse order: stop taking requests, finish or refuse queued work, say offline."""
        self._stopping.set()
        self._set_status("stopping")
        self.link.accept_requests(False, keep_session=True)
        self.watcher.stop()
        if self.scheduler is not None:
            for job in self.scheduler.stop(self.settings.shutdown_grace_s):
                self._refuse(job, Unavailable("the agent is stopping"))
        if self.overflow is not None:
            for job in self.overflow.stop(self.settings.shutdown_grace_s):
                self._refuse(job, Unavailable("the agent is stopping"))
        self.cameras.stop_all()
        self.engine.close()
        offline = self.status.set("offline")
        if not self.link.publish_and_wait(self.topics.status, offline, retain=True):
            log.warning("status.offline_not_acknowledged")
        self.link.stop()
        self.store.close()
        log.info("agent.stopped", outcomes=self.stats.requests.outcomes())

    def apply(self, new: Settings) -> set[str]:
        """Swap in a validated snapshot, restarting only what changed. What can fail (a new
        broker link's set-up, loading a new model) happens before anything is swapped, so a
        failure leaves the running agent untouched."""
        parts = changed_parts(self.settings, new)
        topics = Topics(new.mqtt.topic_prefix, new.device_id)
        link = self._new_link(new, topics) if MQTT in parts else None
        engine = None
        if MODEL in parts:
            engine = make_engine(new)
            try:
                engine.load()  # requests keep running on the old model meanwhile
                self._warm_up(engine, new)
            except BaseException:
                engine.close()
                raise
        old_settings, self.settings, self.limits = self.settings, new, request_limits(new)
        if engine is not None:
            old_engine, self.engine = self.engine, engine
            # Its process ends once the request running on it (if any) is done.
            threading.Thread(target=old_engine.close, name="engine-close", daemon=True).start()
            self.status.set(self.status.state, model=engine.name, provider=engine.provider,
                            provider_reason=engine.provider_reason, **self._batching_status())
        self.engine.longest_s = new.limits.max_timeout_s
        self.handler = self._new_handler()  # the running job finishes on the handler it has
        if self.scheduler is not None:
            self.scheduler.resize(new.limits.queue_size)
            self.scheduler.set_workers(self._max_batch())
        if OVERFLOW in parts:
            self._swap_overflow(new)
        if CAMERAS in parts:
            self.cameras.reconfigure(new.cameras)
        if WATCH in parts or CAMERAS in parts:
            self.watcher.configure(new)
        if WATCH in parts or CAMERAS in parts or HOME_ASSISTANT in parts or MODEL in parts:
            self.home_assistant.announce()
        if LOGGING in parts:
            logging_setup.configure(new.log_level, new.log_format)
        if link is not None:
            self._swap_link(link, topics, old_settings)
        return parts

    def _swap_overflow(self, new: Settings) -> None:
        """The new server takes what overflows from now on; the old one finishes its requests."""
        old, overflow = self.overflow, self._new_overflow(new)
        if overflow is not None:
            overflow.start()
        self.overflow = overflow
        if old is not None:
            def finish() -> None:
                for job in old.stop(new.shutdown_grace_s):
                    self._refuse(job, Unavailable("the overflow server was replaced; send it again"))
            threading.Thread(target=finish, name="overflow-close", daemon=True).start()

    def _swap_link(self, link: BrokerLink, topics: Topics, old: Settings) -> None:
        """Leave the old broker (saying offline there) before joining the new one: with the
        same client id on the same broker the two links would take the session from each other."""
        old_link, old_topics = self.link, self.topics
        old_link.accept_requests(False)
        old_link.publish_and_wait(old_topics.status, self.status.offline_payload(), retain=True)
        old_link.stop()
        self.link, self.topics = link, topics
        link.start()
        link.accept_requests(not self._stopping.is_set())
        log.info("mqtt.switched", old=link_host(old), new=link_host(self.settings))

    def report_config_error(self, problems: list[str] | None) -> None:
        """Shown in the retained status until a good file arrives."""
        self._set_status(self.status.state, config_error=problems)

    def report_degraded(self, error: str) -> None:
        """Queued even while disconnected: a start failure's error must reach the broker before
        the process exits (stop() waits for the connection to say offline)."""
        self.link.publish(self.topics.status, self.status.set("degraded", error=error), retain=True)

    def healthy(self) -> bool:
        return (self.link.loop_alive() and self.watcher.alive()
                and (self.scheduler is None or self.scheduler.alive()))

    def serving(self) -> bool:
        """Model loaded and warmed up, worker running, subscribed, broker connected: what
        READY=1 tells systemd."""
        return self.status.state == "ready" and self.link.connected

    def making_progress(self, now: float | None = None) -> bool:
        """What a systemd watchdog ping vouches for: the MQTT network thread looped lately and
        the inference worker is idle and beating, or within its current job's budget."""
        now = time.monotonic() if now is None else now
        stale_s = MQTT_LOOP_STALE_S + (0.0 if self.link.connected else self.settings.mqtt.reconnect_max_s)
        if not self.link.loop_alive() or now - self.link.last_loop_at > stale_s:
            return False
        return self.scheduler is None or self.scheduler.progressing(self.settings.limits.max_timeout_s, now)

    # --- what comes in (network thread: route to the intake; never generate) ------------------
    def _on_message(self, incoming: Incoming) -> None:
        with self._early_lock:
            if self._early is not None:  # a resumed session delivers at once: hold until ready
                self._early.append(incoming)
                return
        topics = self.topics
        if incoming.topic in (topics.cancel, topics.fleet_cancel):
            self.intake.take_cancel(incoming)
        elif self.home_assistant.takes(incoming):
            self.home_assistant.take(incoming)
        else:
            self.intake.take_request(incoming)

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def ack(self, incoming: Incoming) -> None:
        self.link.ack(incoming)

    def republish(self, topic: str, incoming: Incoming, *, expiry_s: int | None,
                  user_properties: tuple[tuple[str, str], ...], on_refused: Callable[[str], None]) -> None:
        """A request passed on unanswered. Its delivery is acknowledged (on the link it came
        in on) only once the broker has the copy: a crash in between means it comes again."""
        link = self.link
        link.publish(topic, incoming.payload, qos=1, correlation_data=incoming.correlation_data,
                     response_topic=incoming.response_topic, expiry_s=expiry_s,
                     user_properties=user_properties, on_acked=lambda: link.ack(incoming),
                     on_refused=on_refused)

    def _process(self, job: Job, handler: RequestHandler | None = None) -> None:
        handler = handler or self.handler
        assert handler is not None
        try:
            payload, outcome = handler.handle(job, lambda seq, delta: self._publish_chunk(job, seq, delta))
        finally:
            self.in_flight.forget(job)
        if job.on_done is not None:  # a rule run or a Home Assistant prompt: not a pipeline's answer
            job.on_done(payload, outcome)
            return
        latency_ms = (time.monotonic() - job.received_at) * 1000 if outcome == "ok" else None
        self.stats.requests.count(outcome, latency_ms)
        self.delivery.answer(job.request.id, job.request.id_given, job.reply_topic, payload,
                             job.correlation_data, job.message)

    def _publish_chunk(self, job: Job, seq: int, delta: str) -> None:
        """Stream chunks: QoS 0, never stored. The final answer carries the whole text, so a
        chunk lost to a dropped link costs nothing, and none pile up while the broker is away."""
        self.link.publish(job.reply_topic, chunk_payload(job.request.id, seq, delta),
                          correlation_data=job.correlation_data, qos=0)

    def _refuse(self, job: Job, exc: Unavailable) -> None:
        """A queued job that will not run: its error goes where its answer would have."""
        if job.on_done is not None:
            job.on_done(error_payload(job.request.id, exc.code, exc.message), exc.code.value)
        else:
            self.intake.reply_error(job.reply_topic, job.request, exc, job.message)

    def _publish_retained(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Rule state, events, motion: paho queues them while the broker is away (QoS 1)."""
        self.link.publish(topic, payload, retain=retain)

    def _on_motion(self, camera: str, state: str) -> None:
        """From a capture thread: publish the retained state, let the rules know."""
        self.link.publish(self.topics.motion(camera), state.encode(), retain=True)
        self.watcher.on_motion(camera, state)

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

    def _new_overflow(self, settings: Settings) -> Overflow | None:
        if not settings.overflow.base_url:
            return None
        return Overflow(settings.overflow, self._new_handler, self._process)

    def _new_handler(self, engine: Engine | None = None) -> RequestHandler:
        return RequestHandler(engine or self.engine, self.settings.model.max_new_tokens,
                              ImageGatherer(self.cameras, self.settings.images),
                              on_generated=lambda done: self.stats.requests.decoded(done.tokens_per_s),
                              stream_interval_s=self.settings.stream.interval_ms / 1000)

    def _max_batch(self) -> int:
        """Requests generating at once: the setting, else 8 on CPU and 16 on an accelerator
        (a remote server: openai.max_in_flight)."""
        configured = self.settings.inference.max_batch
        if self.settings.model.backend == "openai":
            return configured or self.settings.openai.max_in_flight
        return configured or (8 if self.engine.provider in ("cpu", "") else 16)

    def _batching_status(self) -> dict[str, object]:
        return {"batching": self.engine.batching, "batching_reason": self.engine.batching_reason,
                "max_batch": self._max_batch(), "backend": self.settings.model.backend}

    @staticmethod
    def _warm_up(engine: Any, settings: Settings) -> None:
        if settings.model.warmup:
            warm = engine.warm_up()
            log.info("model.warmed_up", model=engine.name, ms=round(warm.generate_ms, 1))

    # --- status ----------------------------------------------------------------------------
    def _set_status(self, state: str, **fields: object) -> None:
        self.reports.set_status(state, **fields)

    def refresh_status(self, force: bool = False) -> None:
        self.reports.refresh_status(force)

    def publish_stats(self) -> None:
        self.reports.publish_stats()

    def cameras_info(self) -> dict[str, dict[str, Any]]:
        return self.cameras.info()

    def live_status(self, cameras: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The status fields that change while the agent runs (`cameras`: already read)."""
        return {"cameras": self.cameras.info() if cameras is None else cameras, **self._parts_info()}

    def work_info(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {"queue_depth": scheduler.depth if scheduler else 0,
                "busy_rejected": scheduler.rejected if scheduler else 0,
                "in_flight": scheduler.running if scheduler else 0,
                "delivery": self.delivery.stats(), "inference_restarts": self.engine.crashes,
                **self._parts_info(),
                "fleet": self.intake.fleet_info() if self.settings.mqtt.shared_group else None}

    def _parts_info(self) -> dict[str, Any]:
        """Watch rules, the remote backend and the overflow server: in the status and stats."""
        return {"watch": self.watcher.info(),
                "remote": self.engine.info() if isinstance(self.engine, OpenAIServer) else None,
                "overflow": self.overflow.info() if self.overflow is not None else None}


def request_limits(settings: Settings) -> RequestLimits:
    templates = {name: PromptTemplate(t.text, t.system, t.max_tokens,
                                      parse_response_format(t.response_format) if t.response_format else None)
                 for name, t in settings.prompts.templates.items()}
    return RequestLimits(settings.limits.max_payload_bytes, settings.limits.max_prompt_chars,
                         settings.model.max_new_tokens, settings.limits.max_timeout_s,
                         settings.images.max_images, frozenset(settings.cameras),
                         settings.prompts.allow_free_prompts, templates)


def make_engine(settings: Settings) -> EngineProcess | OpenAIServer:
    if settings.model.backend == "openai":
        return OpenAIServer(settings.openai, role="backend")
    model = settings.model
    inference = settings.inference
    engine = EngineProcess(resolve_model_path(settings), model.provider, model.fallback, model.provider_options,
                           log_level=settings.log_level, log_format=settings.log_format,
                           longest_s=settings.limits.max_timeout_s, batching=inference.batching,
                           batch_wait_s=inference.batch_wait_ms / 1000,
                           batch_max_length=inference.batch_max_length)
    if is_catalog_name(str(model.path)):
        engine.name = str(model.path)  # answers say "phi-3.5-mini-instruct", not the variant folder
    return engine


def link_host(settings: Settings) -> str:
    return f"{settings.mqtt.host}:{settings.mqtt.port}"


def open_store(settings: Settings) -> Store:
    delivery = settings.delivery
    return Store(settings.state_dir / "edge-agent.db", outbox_max_items=delivery.outbox_max_items,
                 outbox_max_age_s=delivery.outbox_max_age_s, dedup_window_s=delivery.dedup_window_s)
