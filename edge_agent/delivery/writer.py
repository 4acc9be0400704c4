"""The delivery-writer thread: runs delivery's disk work (store writes, and what must follow
them: acknowledging, publishing) one step at a time, in the order it was handed over, so that
no caller (paho's network thread above all) waits for the disk.

Its queue is bounded (`WRITER_QUEUE_MAX`); overflow policy: `submit` never waits, it refuses,
and the caller applies its own fallback (answer from memory, skip a write) and counts it.
Each step runs in the caller's context variables, so its log lines keep the request id."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Callable

from edge_agent.log import get_logger

log = get_logger("delivery")
WRITER_QUEUE_MAX = 10_000  # steps waiting for the disk (a few per request)
IDLE_EVERY_S = 1.0  # `on_idle` runs when the queue empties, and at least this often while busy
_STOP = object()


class Writer:
    def __init__(self, *, maxsize: int = WRITER_QUEUE_MAX, on_idle: Callable[[], None] = lambda: None,
                 name: str = "delivery-writer") -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._on_idle = on_idle
        self._closed = False
        self._submit_lock = threading.Lock()  # a step accepted before close runs before it ends
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, step: Callable[[], None]) -> bool:
        """Run `step` on the writer thread after every step submitted before. Never waits:
        False when the queue is full or the writer closed (then it will not run)."""
        context = contextvars.copy_context()
        with self._submit_lock:
            if self._closed:
                return False
            try:
                self._queue.put_nowait(lambda: context.run(step))
            except queue.Full:
                return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every step submitted so far has run (and `on_idle` after them). Not for
        paho's network thread: it waits for the disk."""
        done = threading.Event()  # the writer sets it, after `on_idle`
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float) -> bool:
        """Take no more steps, run those queued, end the thread. False: still running at the
        deadline (the disk hangs); what is left may never run."""
        with self._submit_lock:
            self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    @property
    def closed(self) -> bool:
        return self._closed

    def waiting(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        last_idle = time.monotonic()
        while True:
            step = self._queue.get()
            if step is _STOP:
                return
            if isinstance(step, threading.Event):  # a flush: `on_idle` brought up to date, then woken
                self._idle()
                step.set()
                continue
            try:
                step()  # type: ignore[operator]
            except Exception:  # noqa: BLE001 - one failed step must not end the thread
                log.exception("delivery.step_failed")
            if self._queue.empty() or time.monotonic() - last_idle > IDLE_EVERY_S:
                last_idle = time.monotonic()
                self._idle()

    def _idle(self) -> None:
        try:
            self._on_idle()
        except Exception:  # noqa: BLE001
            log.exception("delivery.step_failed")
