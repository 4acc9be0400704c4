"""The one shape of work: every request, rule run and Home Assistant prompt becomes a `Job`.
A job ends one way: `finish`, which forgets it for cancels and hands the answer to its `end`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from edge_agent.errors import AgentError
from edge_agent.inference.types import Generation
from edge_agent.protocol import Request, error_payload


class RunningRequest(Protocol):
    def result(self) -> Generation: ...

    def cancel(self) -> None: ...


class Runner(Protocol):
    """What runs a job: the request handler of the settings snapshot it was accepted under."""

    def handle(self, job: Job, publish_chunk: Callable[[int, str], None] | None = None) -> tuple[bytes, str]: ...


class JobEnd(Protocol):
    """Where a job's answer goes: a pipeline's reply topic (through delivery), a rule's state,
    Home Assistant's sensor. `final`: False for a refusal (a re-send of its id may run)."""

    def answered(self, job: Job, payload: bytes, outcome: str, final: bool) -> None: ...

    def chunk(self, job: Job, seq: int, delta: str) -> None: ...


class CallbackEnd:
    """The end of work written here (rule runs, Home Assistant prompts): one callback, no stream."""

    def __init__(self, on_done: Callable[[bytes, str], None]) -> None:
        self._on_done = on_done

    def answered(self, job: Job, payload: bytes, outcome: str, final: bool) -> None:
        self._on_done(payload, outcome)

    def chunk(self, job: Job, seq: int, delta: str) -> None:
        """Rule runs and Home Assistant prompts never stream."""


@dataclass
class Job:
    """An accepted request on its way through the queue and the engine."""

    request: Request
    reply_topic: str
    correlation_data: bytes | None = None
    received_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which it must not run
    message: Any = None  # the MQTT message it came in, acknowledged once the answer is safe
    # A watch rule's run: it waits behind every request and never makes one `busy`.
    background: bool = False
    end: JobEnd | None = None
    # Runs it: fixed when it is accepted, so a reload never changes a request already taken.
    runner: Runner | None = None
    cancelled: bool = False
    _running: RunningRequest | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _forget: Callable[[Job], None] | None = field(default=None, repr=False)

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline

    def cancel(self) -> None:
        """End it with the text it has: queued, it is answered at once when its turn comes."""
        with self._lock:
            self.cancelled = True
            running = self._running
        if running is not None:
            running.cancel()

    def running(self, handle: RunningRequest) -> None:
        with self._lock:
            self._running = handle
            cancelled = self.cancelled
        if cancelled:  # a cancel that came while it was being handed over
            handle.cancel()

    def tracked_by(self, forget: Callable[[Job], None]) -> None:
        """Registered where a cancel can reach it; `forget` runs when it ends."""
        self._forget = forget

    def untrack(self) -> None:
        """Out of reach of cancels (it ended, or its runner failed)."""
        if self._forget is not None:
            self._forget(self)

    def finish(self, payload: bytes, outcome: str, *, final: bool = True) -> None:
        """The one way a job ends: out of reach of cancels, its answer to its end."""
        self.untrack()
        if self.end is not None:
            self.end.answered(self, payload, outcome, final)

    def refuse(self, exc: AgentError) -> None:
        """A job that will not run: its error goes where its answer would have."""
        self.finish(error_payload(self.request.id, exc.code, exc.message), exc.code.value, final=False)


def run(job: Job) -> None:
    """A worker's step: run the job on the runner it was accepted with, then end it."""
    assert job.runner is not None
    try:
        payload, outcome = job.runner.handle(job, lambda seq, delta: _chunk(job, seq, delta))
    except BaseException:
        job.untrack()
        raise
    job.finish(payload, outcome)


def _chunk(job: Job, seq: int, delta: str) -> None:
    if job.end is not None:
        job.end.chunk(job, seq, delta)
