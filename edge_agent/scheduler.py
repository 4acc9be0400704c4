"""The bounded queue in front of the single inference worker.

Overflow policy: reject. A full queue answers the new request `busy` at once (the caller does
that when `submit` returns False); nothing already accepted is dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import structlog

from edge_agent.handler import Job
from edge_agent.log import get_logger

log = get_logger("scheduler")
_STOP = object()
BEAT_S = 1.0  # an idle worker beats at least this often
IDLE_STALE_S = 5.0  # an idle worker silent this long is wedged
# Time a job may run past its own budget before the worker counts as wedged: a long prompt's
# prefill on a slow CPU happens before the first deadline check, camera waits come first.
STUCK_GRACE_S = 300.0


class Scheduler:
    def __init__(self, queue_size: int, process: Callable[[Job], None]) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._process = process
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self.rejected = 0
        self.last_beat = time.monotonic()
        self.busy: tuple[float, float | None] | None = None  # (started, deadline) of the job

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def progressing(self, budget_s: float, now: float | None = None) -> bool:
        """Whether the worker shows progress: idle and beating, or on its current job for less
        than that job's budget (its deadline, at most `budget_s` after it started) plus
        STUCK_GRACE_S. The engine checks the deadline between tokens, so a job past that is stuck."""
        if not self._thread.is_alive():
            return False
        now = time.monotonic() if now is None else now
        busy = self.busy
        if busy is None:
            return now - self.last_beat < IDLE_STALE_S
        started, deadline = busy
        limit = started + budget_s if deadline is None else min(deadline, started + budget_s)
        return now < limit + STUCK_GRACE_S

    def resize(self, queue_size: int) -> None:
        """A new bound, live: a smaller one lets the queue drain below it, nothing is dropped."""
        with self._queue.mutex:
            self._queue.maxsize = queue_size

    def submit(self, job: Job) -> bool:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.rejected += 1
            return False
        return True

    def stop(self, grace_s: float) -> list[Job]:
        """Stop taking work; wait up to `grace_s` for the running job; return unstarted jobs."""
        pending: list[Job] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                pending.append(item)
        self._queue.put(_STOP)
        self._thread.join(timeout=grace_s)
        if self._thread.is_alive():
            log.warning("worker.grace_exceeded", grace_s=grace_s)
        return pending

    def _work(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            try:
                item = self._queue.get(timeout=BEAT_S)
            except queue.Empty:
                continue
            if item is _STOP:
                return
            assert isinstance(item, Job)
            self.busy = (time.monotonic(), item.deadline)
            with structlog.contextvars.bound_contextvars(request_id=item.request.id):
                try:
                    self._process(item)
                except Exception:  # noqa: BLE001 - the worker outlives any one request
                    log.exception("worker.process_failed")
                finally:
                    self.last_beat = time.monotonic()  # before busy clears: never looks stale
                    self.busy = None
