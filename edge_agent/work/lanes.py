"""The queues in front of the inference workers: `workers` threads (inference.max_batch) take
jobs and wait on the engine, so that many requests generate at once.

Two lanes. Requests: bounded by `queue_size`; overflow policy reject (a full queue answers the
new request `busy` at once: the caller does that when `submit` returns False); nothing accepted
is dropped. Background (watch rule runs): bounded by BACKGROUND_MAX, reject (counted, the rule
runs at its next turn); a worker takes a background job only when no request waits, and at most
`workers - 1` run at once, so a request always finds a worker soon and never gets `busy` for them.
"""

from __future__ import annotations

import threading
from collections import deque
import time
from typing import Callable

import structlog

from edge_agent.work.jobs import Job
from edge_agent.log import get_logger

log = get_logger("scheduler")
_STOP = object()
BEAT_S = 1.0  # an idle worker beats at least this often
IDLE_STALE_S = 5.0  # an idle worker silent this long is wedged
# Time a job may run past its own budget before the worker counts as wedged: a long prompt's
# prefill on a slow CPU happens before the first deadline check, camera waits come first.
STUCK_GRACE_S = 300.0
BACKGROUND_MAX = 64


class _Lanes:
    """Requests before background work, under one condition so a waiting worker sees both."""

    def __init__(self, queue_size: int) -> None:
        self.cond = threading.Condition()
        self.requests: deque[object] = deque()
        self.background: deque[Job] = deque()
        self.maxsize = queue_size
        self.background_running = 0
        self.background_limit = 1

    def put(self, job: Job) -> bool:
        with self.cond:
            lane, bound = (self.background, BACKGROUND_MAX) if job.background else (self.requests, self.maxsize)
            if len(lane) >= bound:
                return False
            lane.append(job)
            self.cond.notify()
            return True

    def put_stops(self, count: int) -> None:
        with self.cond:  # past the bound: a full queue must not block the stop
            self.requests.extendleft([_STOP] * count)
            self.cond.notify_all()

    def get(self, timeout: float) -> object | None:
        with self.cond:
            self.cond.wait_for(self._ready, timeout)
            if self.requests:
                return self.requests.popleft()
            if self.background and self.background_running < self.background_limit:
                self.background_running += 1
                return self.background.popleft()
            return None

    def _ready(self) -> bool:
        return bool(self.requests) or (bool(self.background) and self.background_running < self.background_limit)

    def background_done(self) -> None:
        with self.cond:
            self.background_running -= 1
            self.cond.notify()

    def queued(self) -> list[Job]:
        with self.cond:
            return [item for item in (*self.requests, *self.background) if isinstance(item, Job)]

    def drain(self) -> list[Job]:
        with self.cond:
            jobs = self.queued()  # the condition's lock is reentrant
            self.requests.clear()
            self.background.clear()
            return jobs


class Scheduler:
    def __init__(self, queue_size: int, process: Callable[[Job], None], workers: int = 1) -> None:
        self._lanes = _Lanes(queue_size)
        self._process = process
        self._workers = [_Worker(self._lanes, process, f"inference-{n}") for n in range(workers)]
        self._lanes.background_limit = max(1, workers - 1)
        self._started = False
        self.rejected = 0  # requests answered `busy`
        self.background_rejected = 0

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
            worker = _Worker(self._lanes, self._process, f"inference-{len(self._workers) + n}")
            self._workers.append(worker)
            if self._started:
                worker.thread.start()
        self._workers = [w for w in self._workers if not w.retiring or w.thread.is_alive()]
        with self._lanes.cond:
            self._lanes.background_limit = max(1, count - 1)
            self._lanes.cond.notify_all()

    @property
    def depth(self) -> int:
        """Requests waiting (background work not counted)."""
        return len(self._lanes.requests)

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
        with self._lanes.cond:
            self._lanes.maxsize = queue_size

    def jobs(self) -> list[Job]:
        """Queued and running, at this moment."""
        return self._lanes.queued() + [job for job in (worker.job for worker in self._workers) if job is not None]

    def submit(self, job: Job) -> bool:
        if self._lanes.put(job):
            return True
        if job.background:
            self.background_rejected += 1
        else:
            self.rejected += 1
        return False

    def stop(self, grace_s: float) -> list[Job]:
        """Stop taking work; wait up to `grace_s` for the running job; return unstarted jobs."""
        pending = self._lanes.drain()
        if not self._started:  # the model never loaded: no worker to wait for
            return pending
        self._lanes.put_stops(len(self._workers))
        deadline = time.monotonic() + grace_s
        for worker in self._workers:
            worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(worker.thread.is_alive() for worker in self._workers):
            log.warning("worker.grace_exceeded", grace_s=grace_s)
        return pending


class _Worker:
    def __init__(self, lanes: _Lanes, process: Callable[[Job], None], name: str) -> None:
        self._lanes = lanes
        self._process = process
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.last_beat = time.monotonic()
        self.busy: tuple[float, float | None] | None = None  # (started, deadline) of the job
        self.job: Job | None = None
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
            item = self._lanes.get(BEAT_S)
            if item is None:
                continue
            if item is _STOP:
                return
            assert isinstance(item, Job)
            self.busy, self.job = (time.monotonic(), item.deadline), item
            with structlog.contextvars.bound_contextvars(request_id=item.request.id):
                try:
                    self._process(item)
                except Exception:  # noqa: BLE001 - the worker outlives any one request
                    log.exception("worker.process_failed")
                finally:
                    self.last_beat = time.monotonic()  # before busy clears: never looks stale
                    self.busy = self.job = None
                    if item.background:
                        self._lanes.background_done()
