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


class Scheduler:
    def __init__(self, queue_size: int, process: Callable[[Job], None]) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._process = process
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self.rejected = 0
        self.last_beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def alive(self) -> bool:
        return self._thread.is_alive()

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
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is _STOP:
                return
            assert isinstance(item, Job)
            with structlog.contextvars.bound_contextvars(request_id=item.request.id):
                try:
                    self._process(item)
                except Exception:  # noqa: BLE001 - the worker outlives any one request
                    log.exception("worker.process_failed")
