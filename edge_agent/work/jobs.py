"""The one shape of work: every request, rule run and Home Assistant prompt becomes a `Job`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from edge_agent.inference.types import Generation
from edge_agent.protocol import Request


class RunningRequest(Protocol):
    def result(self) -> Generation: ...

    def cancel(self) -> None: ...


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
    # Where the answer goes instead of the reply topic (rule state, Home Assistant's sensor).
    on_done: Callable[[bytes, str], None] | None = None
    cancelled: bool = False
    _running: RunningRequest | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
