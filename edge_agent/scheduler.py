"""The bounded queue in front of the inference workers: `workers` threads (inference.max_batch)
take jobs and wait on the engine, so that many requests generate at once.

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
    def __init__(self, queue_size: int, process: Callable[[Job], None], workers: int = 1) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._process = process
        self._workers = [_Worker(self._queue, process, f"inference-{n}") for n in range(workers)]
        self._started = False
        self.rejected = 0

    def start(self) -> None:
        self._started = True
        for worker in self._workers:
            worker.thread.start()

    def set_workers(self, count: int) -> None:
        """A new inference.max_batch, live: more workers start now; a worker beyond the new count
        leaves after the job it has."""
        live = [w for w in self._workers if not w.retiring]
        for worker in live[count:]:
            worker.retiring = True
        for n in range(len(live), count):
            worker = _Worker(self._queue, self._process, f"inference-{len(self._workers) + n}")
            self._workers.append(worker)
            if self._started:
                worker.thread.start()
        self._workers = [w for w in self._workers if not w.retiring or w.thread.is_alive()]

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return sum(1 for worker in self._workers if worker.busy is not None)

    def alive(self) -> bool:
        return all(worker.thread.is_alive() for worker in self._workers if not worker.retiring)

    def progressing(self, budget_s: float, now: float | None = None) -> bool:
        """Whether every worker shows progress: idle and beating, or on its current job for
        less than that job's budget (its deadline, at most `budget_s` after it started) plus
        STUCK_GRACE_S. The engine checks the deadline between tokens, so a job past that is stuck."""
        now = time.monotonic() if now is None else now
        return all(worker.progressing(budget_s, now) for worker in self._workers if not worker.retiring)

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
        with self._queue.mutex:  # past the bound: a full queue must not block the stop
            for _ in self._workers:
                self._queue.queue.append(_STOP)
                self._queue.unfinished_tasks += 1
                self._queue.not_empty.notify()
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(worker.thread.is_alive() for worker in self._workers):
            log.warning("worker.grace_exceeded", grace_s=grace_s)
        return pending


class _Worker:
    def __init__(self, jobs: queue.Queue[object], process: Callable[[Job], None], name: str) -> None:
        self._queue = jobs
        self._process = process
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.last_beat = time.monotonic()
        self.busy: tuple[float, float | None] | None = None  # (started, deadline) of the job
        self.retiring = False

    def progressing(self, budget_s: float, now: float) -> bool:
        if not self.thread.is_alive():
            return False
        busy = self.busy
        if busy is None:
            return now - self.last_beat < IDLE_STALE_S
        started, deadline = busy
        limit = started + budget_s if deadline is None else min(deadline, started + budget_s)
        return now < limit + STUCK_GRACE_S

    def _work(self) -> None:
        while not self.retiring:
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
