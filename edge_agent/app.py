"""Wires the parts. Start order lives in `Agent.start`, shutdown in reverse in `Agent.stop`."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from types import FrameType

import structlog

from edge_agent.errors import AgentError, BrokerError, ConfigError, ErrorCode, ModelLoadError, Unavailable
from edge_agent.handler import Job, RequestHandler
from edge_agent.inference import GenerationParams, OrtGenaiEngine
from edge_agent.health import StatusBoard
from edge_agent.log import get_logger
from edge_agent.mqtt import BrokerLink, Incoming
from edge_agent.protocol import (RequestError, RequestLimits, Topics, choose_reply_topic,
                                 error_payload, parse_request)
from edge_agent.camera import validate_cameras
from edge_agent.cameras import CameraSet
from edge_agent.scheduler import Scheduler
from edge_agent.vision import ImageGatherer
from edge_agent.settings import Settings

log = get_logger("app")
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 78
BUSY_RETRY_AFTER_MS = 1000
HEALTH_CHECK_S = 1.0
STATUS_REFRESH_S = 30.0


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.mqtt.topic_prefix, settings.device_id)
        self.limits = RequestLimits(settings.limits.max_payload_bytes, settings.limits.max_prompt_chars,
                                    settings.model.max_new_tokens, settings.limits.max_timeout_s,
                                    settings.images.max_images, frozenset(settings.cameras))
        self.cameras = CameraSet(settings.cameras)
        self.status = StatusBoard(settings.device_id)
        self.outcomes: Counter[str] = Counter()
        self.engine = OrtGenaiEngine(settings.model.path, settings.model.provider)
        self.scheduler: Scheduler | None = None
        self.link = BrokerLink(settings.mqtt, settings.client_id, request_topic=self.topics.request,
                               will_topic=self.topics.status, will_payload=self.status.offline_payload(),
                               on_message=self._on_message, on_connected=self._publish_status)
        self._stopping = threading.Event()
        self._camera_states: dict[str, str] = {}
        self._status_at = 0.0

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Broker first (so `starting` is visible), cameras (they open in the background),
        then model, warm-up, worker, subscription."""
        self.link.start()
        self.cameras.start_all()
        self.engine.load()
        self._set_status("starting", model=self.engine.name, provider=self.engine.provider)
        if self.settings.model.warmup:
            warm = self.engine.warm_up()
            log.info("model.warmed_up", ms=round(warm.generate_ms, 1))
        handler = RequestHandler(self.engine, GenerationParams, self.settings.model.max_new_tokens,
                                 ImageGatherer(self.cameras, self.settings.images))
        self.scheduler = Scheduler(self.settings.limits.queue_size, lambda job: self._process(handler, job))
        self.scheduler.start()
        self.link.accept_requests(True)
        self._set_status("ready", cameras=self.cameras.info())
        log.info("agent.ready", request_topic=self.topics.request)

    def stop(self) -> None:
        """Reverse order: stop taking requests, finish or refuse queued work, say offline."""
        self._stopping.set()
        self._set_status("stopping")
        self.link.accept_requests(False)
        if self.scheduler is not None:
            for job in self.scheduler.stop(self.settings.shutdown_grace_s):
                self._reply_error(job.reply_topic, job.request.id, Unavailable("the agent is stopping"),
                                  job.correlation_data)
        self.cameras.stop_all()
        offline = self.status.set("offline")
        if not self.link.publish_and_wait(self.topics.status, offline, retain=True):
            log.warning("status.offline_not_acknowledged")
        self.link.stop()
        log.info("agent.stopped", outcomes=dict(self.outcomes))

    def report_degraded(self, error: str) -> None:
        self._set_status("degraded", error=error)

    def healthy(self) -> bool:
        return self.link.loop_alive() and (self.scheduler is None or self.scheduler.alive())

    # --- requests (network thread: parse, validate, enqueue; never generate) ----------------
    def _on_message(self, incoming: Incoming) -> None:
        received = time.monotonic()
        try:
            request = parse_request(incoming.payload, self.limits)
        except RequestError as exc:
            with structlog.contextvars.bound_contextvars(request_id=exc.request_id):
                self._reply_error(self._error_topic(incoming), exc.request_id, exc,
                                  incoming.correlation_data)
            return
        with structlog.contextvars.bound_contextvars(request_id=request.id):
            try:
                topic = choose_reply_topic(incoming.response_topic, request.reply_to,
                                           self.topics.response, self.settings.mqtt.reply_topic_allow)
            except AgentError as exc:
                self._reply_error(self.topics.response, request.id, exc, incoming.correlation_data)
                return
            if self._stopping.is_set() or self.scheduler is None:
                self._reply_error(topic, request.id, Unavailable("the agent is stopping"),
                                  incoming.correlation_data)
                return
            job = Job(request, topic, incoming.correlation_data, received,
                      self._deadline(received, request.timeout_s, incoming.expiry_s))
            if not self.scheduler.submit(job):
                self._reply_error(topic, request.id, AgentError(
                    f"queue full ({self.settings.limits.queue_size} waiting)", ErrorCode.BUSY),
                    incoming.correlation_data, retry_after_ms=BUSY_RETRY_AFTER_MS)
                return
            log.info("request.accepted", queue_depth=self.scheduler.depth, reply_topic=topic)

    def _error_topic(self, incoming: Incoming) -> str:
        """Where the error for an unreadable request goes: its response topic if usable."""
        try:
            return choose_reply_topic(incoming.response_topic, None, self.topics.response,
                                      self.settings.mqtt.reply_topic_allow)
        except AgentError:
            return self.topics.response

    @staticmethod
    def _deadline(received: float, timeout_s: float | None, expiry_s: int | None) -> float | None:
        limits = [v for v in (timeout_s, expiry_s) if v is not None]
        return received + min(limits) if limits else None

    def _process(self, handler: RequestHandler, job: Job) -> None:
        payload, outcome = handler.handle(job)
        self.outcomes[outcome] += 1
        self.link.publish(job.reply_topic, payload, correlation_data=job.correlation_data)

    def _reply_error(self, topic: str, request_id: str | None, exc: AgentError,
                     correlation_data: bytes | None, **extra: object) -> None:
        self.outcomes[exc.code.value] += 1
        log.info("request.rejected", code=exc.code.value, reason=exc.message)
        self.link.publish(topic, error_payload(request_id, exc.code, exc.message, **extra),
                          correlation_data=correlation_data)

    # --- status ----------------------------------------------------------------------------
    def _set_status(self, state: str, **fields: object) -> None:
        self.status.set(state, **fields)
        self._publish_status()

    def refresh_status(self, force: bool = False) -> None:
        """Republish when a camera changed state, or every STATUS_REFRESH_S for fps and ages."""
        cameras = self.cameras.info()
        states = {name: info["state"] for name, info in cameras.items()}
        now = time.monotonic()
        if force or states != self._camera_states or now - self._status_at >= STATUS_REFRESH_S:
            self._camera_states = states
            self._set_status(self.status.state, cameras=cameras)

    def _publish_status(self) -> None:
        self._status_at = time.monotonic()
        self.link.publish(self.topics.status, self.status.payload(), retain=True)


def check_model_folder(settings: Settings) -> None:
    if not (settings.model.path / "genai_config.json").is_file():
        raise ConfigError([f"model.path: {settings.model.path} is not a model folder "
                           "(no genai_config.json)"])


def run(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    check_model_folder(settings)
    validate_cameras(settings)
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()
        if signum == signal.SIGINT:  # a second Ctrl-C forces exit
            signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent = Agent(settings)
    except (BrokerError, ModelLoadError) as exc:
        log.error("agent.config_error", error=str(exc))
        return EXIT_CONFIG
    code = EXIT_OK
    try:
        agent.start()
        while not stop_requested.wait(HEALTH_CHECK_S):
            agent.refresh_status()
            if not agent.healthy():
                log.error("agent.unhealthy", mqtt_loop=agent.link.loop_alive())
                code = EXIT_FAILURE
                break
    except ModelLoadError as exc:
        log.error("model.load_failed", error=str(exc))
        agent.report_degraded(str(exc))
        code = EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - say so on the status topic before exiting
        log.exception("agent.start_failed")
        agent.report_degraded(f"{type(exc).__name__}: {exc}")
        code = EXIT_FAILURE
    agent.stop()
    return code
