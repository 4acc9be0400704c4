"""The daemon's side of the inference child (`child/worker.py`): requests go in with ids, events
come back and one reader thread routes them to each request's `Handle`.

Why a process: ONNX Runtime GenAI keeps the GIL inside its calls (7 ms a token on SmolLM2,
60 ms for a prompt), so generation in a thread of the daemon stalled the MQTT thread. And the
runtime ends its process on some inputs; now that ends the child only: every request in flight
gets `internal`, a new child loads the model, the daemon goes on. This module imports neither
onnxruntime_genai nor numpy (nor anything of `child/`): the daemon stays small.

Threads: callers submit and cancel (a cancel comes on paho's network thread); per child, one
reader routes its events and one writer sends to it; a restart thread loads a new child. None
of the callers ever waits for a model load, a child's start or a socket.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edge_agent.errors import AgentError, Internal, ModelLoadError, Timeout, Unavailable
from edge_agent.inference.channel import STOP_WAIT_S, Child, Handle, pack
from edge_agent.inference.memory import MemoryPlan
from edge_agent.inference.types import (DEFAULT_BATCH_MAX_LENGTH, DEFAULT_BATCH_WAIT_S, FINISH_CANCELLED,
                                        WARMUP_TOKENS, Generation, GenerationParams, LoadedInfo, LoadSpec,
                                        Work, read_genai_config, takes_images)
from edge_agent.log import get_logger

log = get_logger("inference")
POLL_S = 0.25
# The child checks deadlines between tokens; a request stuck inside a single call this long
# past its deadline is ended with the child.
STUCK_GRACE_S = 10.0


class LocalInference:
    """The client of the local inference process: one model loaded in a child process, any
    number of callers, each with its own handle.

    `_lock` guards the handle table, the requests waiting for a child and which child is
    current; it is never held across I/O, a wait or a load. `_load_lock` lets one load run at
    a time (the first, or a restart on its own thread)."""

    def __init__(self, folder: Path, provider: str = "auto", fallback: Sequence[str] = ("cpu",),
                 provider_options: Mapping[str, object] | None = None, *, log_level: str = "info",
                 log_format: str = "auto", longest_s: float | None = None,
                 stuck_grace_s: float = STUCK_GRACE_S, batching: bool = True,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
                 batch_max_length: int = DEFAULT_BATCH_MAX_LENGTH, memory: MemoryPlan | None = None,
                 prefix_cache: bool = True) -> None:
        self.folder = folder
        self.memory = memory  # the plan this model was loaded under (None: no budget)
        self.reserved_bytes = 0  # requests' caches held in the child now (its "memory" events)
        self.loaded_bytes = 0  # what the child's load took, as it measured it
        # A request with no deadline of its own is stuck once it runs longer than this
        # (limits.max_timeout_s) plus the grace: ended here, before the systemd watchdog would
        # restart the whole daemon for it.
        self.longest_s = longest_s
        self.stuck_grace_s = stuck_grace_s
        if memory is not None:
            batching, batch_max_length = memory.batching, memory.batch_max_length
        self._spec = LoadSpec(folder=str(folder), provider=provider, fallback=tuple(fallback),
                              provider_options=dict(provider_options or {}), log_level=log_level,
                              log_format=log_format, batching=batching, batch_wait_s=batch_wait_s,
                              batch_max_length=batch_max_length,
                              cache_budget_bytes=memory.cache_budget_bytes if memory else None,
                              kv_bytes_per_token=memory.kv_bytes_per_token if memory else 0,
                              logits_bytes_per_token=memory.logits_bytes_per_token if memory else 0,
                              planned_load_bytes=memory.load_bytes if memory else 0, prefix_cache=prefix_cache)
        self.name = folder.name
        self.supports_images = takes_images(read_genai_config(folder))  # fails early on a bad folder
        self.context_length: int | None = None
        self.provider, self.provider_reason = "", ""
        self.provider_attempts: tuple[Any, ...] = ()
        self.batching, self.batching_reason, self.batch_group = "off", "not loaded", 1
        self.crashes = 0
        self._lock = threading.Lock()
        self._child: Child | None = None  # None: dead, or not loaded (again) yet
        self._handles: dict[int, Handle] = {}
        # Submits taken while no child was up, with their deadlines: sent to the next child.
        self._waiting: dict[int, tuple[bytes, float | None]] = {}
        self._restarting = False
        self._loading: subprocess.Popen[bytes] | None = None  # a child loading: close() ends it
        self._closed = False
        self._load_lock = threading.Lock()
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def load(self) -> None:
        with self._load_lock:
            self._adopt(self._start())

    def warm_up(self) -> Generation:
        """A short generation; with batching, a full group at once: the group path is warm at
        `ready` (the child warmed the batching engine's cache, which the runtime sizes to the
        largest group it has run, as it loaded)."""
        work = Work(({"role": "user", "content": "Hello"},), GenerationParams(WARMUP_TOKENS))
        handles = [self.submit(work) for _ in range(self.batch_group if self.batching != "off" else 1)]
        return [handle.result() for handle in handles][0]

    def generate(self, messages: Sequence[dict[str, str]], params: GenerationParams,
                 deadline: float | None = None, images: Sequence[bytes] = ()) -> Generation:
        return self.submit(Work(tuple(messages), params, deadline, tuple(images))).result()

    def submit(self, work: Work, on_token: Callable[[str], None] | None = None) -> Handle:
        """Hand a request to the child; its events reach the returned handle. With no child up
        (one died, or could not be loaded again), it waits for the next one, not the caller."""
        handle = Handle(next(self._ids), self._limit(work.deadline), on_token)
        handle._cancel = self.cancel
        message = pack(("submit", handle.rid, work))
        restart = False
        with self._lock:
            if self._closed:
                raise Unavailable("the model was unloaded")
            self._handles[handle.rid] = handle
            child = self._child
            if child is None:
                self._waiting[handle.rid] = (message, work.deadline)
                restart = self._claim_restart()
            else:
                child.send(message)  # a dead child's reader fails the handle
        if restart:
            self._restart_in_background()
        return handle

    def cancel(self, rid: int) -> None:
        """End a request with the text it has. Called on paho's network thread: never waits."""
        with self._lock:
            child = self._child
            unsent = child is None or rid in self._waiting
            handle = self._handles.pop(rid, None) if unsent else None
            self._waiting.pop(rid, None)
            running = rid in self._handles
        if handle is not None:  # never reached a child: it ends here, as a cancel before the start does
            handle.put("done", Generation("", FINISH_CANCELLED, 0, 0, None, 0.0))
        elif running and child is not None:
            child.send(pack(("cancel", rid)))

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop the child once the requests in flight are done, or after `wait_s`: then those
        fail `unavailable`."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + wait_s
        while self._handles and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            child, self._child, loading = self._child, None, self._loading
            handles = self._take_handles()
        _fail(handles, lambda handle: Unavailable("the model was unloaded"))
        if loading is not None:
            loading.kill()  # a restart under way: its load fails at once
        if child is not None:
            child.stop()
        with self._load_lock:
            pass  # a restart under way has ended, and stopped the child it made

    # --- the child -------------------------------------------------------------------------
    def _start(self) -> Child:
        """Start a child and load the model there; raises ModelLoadError as OrtGenaiEngine does."""
        ours, theirs = socket.socketpair()
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.inference.child.worker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"cannot start the inference process: {exc}") from exc
        finally:
            theirs.close()
        child = Child(proc, Connection(ours.detach()))
        with self._lock:
            self._loading, closed = proc, self._closed
        try:
            if closed:
                proc.kill()
            reply = self._handshake(child)
        finally:
            with self._lock:
                self._loading = None
        if reply is None or reply[0] != "loaded":
            code = child.stop()
            if reply is not None and reply[0] == "error":
                raise reply[1]
            raise ModelLoadError(f"the inference process ended while loading {self.folder} "
                                 f"({_exit_text(code)})")
        info: LoadedInfo = reply[1]
        self.provider, self.provider_reason = info.provider, info.provider_reason
        self.provider_attempts, self.context_length = info.provider_attempts, info.context_length
        self.supports_images = info.supports_images
        self.batching, self.batching_reason, self.batch_group = info.batching, info.batching_reason, info.batch_group
        self.reserved_bytes = 0  # a new child holds no request's cache yet
        self.loaded_bytes = info.loaded_bytes
        note = self.memory.batching_note if self.memory is not None else None
        if note:  # the plan shortened the batch cache, or turned batching off: say so, not the setting
            self.batching_reason = f"memory plan: {note}" if info.batching == "off" else \
                f"{info.batching_reason}; memory plan: {note}"
        log.info("inference.process_started", pid=proc.pid, model=self.name, provider=self.provider,
                 batching=self.batching, ms=round((time.monotonic() - started) * 1000, 1))
        return child

    def _handshake(self, child: Child) -> tuple[Any, ...] | None:
        """Send the spec, wait for the child's answer; None if it ended first."""
        child.send(pack(("load", self._spec)))
        try:
            while not child.conn.poll(POLL_S):
                if child.proc.poll() is not None and not child.conn.poll(0):
                    return None
            return child.conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError):
            return None

    def _adopt(self, child: Child) -> None:
        """Make a loaded child the current one and send it the requests that waited for it."""
        with self._lock:
            self._restarting = False
            closed = self._closed
            if not closed:
                self._child = child
                for rid, (message, deadline) in self._waiting.items():
                    self._handles[rid].limit = self._limit(deadline)  # the load is no part of its run
                    child.send(message)
                self._waiting.clear()
        if closed:
            child.stop()
            return
        threading.Thread(target=self._read, args=(child,), name="inference-reader", daemon=True).start()

    def _limit(self, deadline: float | None) -> float | None:
        """Past this (plus the grace) a request that has run in the child is stuck."""
        if deadline is None and self.longest_s is not None:
            return time.monotonic() + self.longest_s
        return deadline

    def _claim_restart(self) -> bool:
        """Under `_lock`: True if the caller is to start the one restart."""
        if self._closed or self._restarting:
            return False
        self._restarting = True
        return True

    def _restart_in_background(self) -> None:
        threading.Thread(target=self._restart, name="inference-restart", daemon=True).start()

    def _restart(self) -> None:
        """Load the model in a new child. If that fails, the requests that waited for it fail
        with the load's error and the next request tries again."""
        with self._load_lock:
            if self._closed:
                return  # close() failed what waited
            try:
                child = self._start()
            except (ModelLoadError, AgentError) as exc:
                log.error("inference.restart_failed", error=str(exc))
                with self._lock:
                    self._restarting = False
                    waiting = [self._handles.pop(rid) for rid in self._waiting if rid in self._handles]
                    self._waiting.clear()
                failure = exc  # `exc` is unbound once the except block ends
                _fail(waiting, lambda handle: failure)
                return
            self._adopt(child)

    def _read(self, child: Child) -> None:
        """Route the child's events until it dies or is replaced; then fail what it had."""
        while True:
            try:
                message = child.conn.recv() if child.conn.poll(POLL_S) else None
            except (EOFError, OSError):
                break
            if message is not None:
                self._route(message[1])
            elif child.proc.poll() is not None:
                break
            if self._stuck(child):
                return
        self._replace_dead_child(child)

    def _route(self, events: list[tuple[str, int, Any]]) -> None:
        for kind, _, value in events:
            if kind == "memory":
                self.reserved_bytes = int(value)
        events = [event for event in events if event[0] != "memory"]
        with self._lock:
            routed = [(self._handles.get(rid) if kind == "token" else self._handles.pop(rid, None), kind, value)
                      for kind, rid, value in events]
        for handle, kind, value in routed:
            if handle is not None:
                handle.put(kind, value)

    def _stuck(self, child: Child) -> bool:
        """A request past its limit by the grace is stuck in one runtime call: end the child."""
        now = time.monotonic()
        with self._lock:
            stuck_ids = {rid for rid, h in self._handles.items()
                         if h.limit is not None and now > h.limit + self.stuck_grace_s}
            if not stuck_ids or self._child is not child:
                return bool(stuck_ids)
            self._child = None
            handles = self._take_handles()
            restart = self._claim_restart()
        log.error("inference.stuck", pid=child.pid, requests=len(stuck_ids), past_deadline_s=self.stuck_grace_s)
        child.stop(kill=True)
        _fail(handles, lambda h: Timeout("generation stuck past its deadline; the model is loaded again")
              if h.rid in stuck_ids else
              Internal("the inference process was restarted (another request was stuck)"))
        if restart:
            self._restart_in_background()
        return True

    def _replace_dead_child(self, child: Child) -> None:
        """The child died (the runtime exited, was killed, ran out of memory): every request it
        had fails, a new child loads the model for the next."""
        with self._lock:
            if self._child is not child:
                return  # closed, or ended as stuck
            self._child = None
            handles = self._take_handles()
            closed = self._closed
            if not closed:
                self.crashes += 1
            restart = self._claim_restart()
        code = child.stop()
        if closed:
            _fail(handles, lambda handle: Unavailable("the model was unloaded"))
            return
        log.error("inference.process_died", exit=_exit_text(code), model=self.name, in_flight=len(handles))
        _fail(handles, lambda handle: Internal(
            f"the inference process died ({_exit_text(code)}); a new one is loading the model"))
        if restart:
            self._restart_in_background()

    def _take_handles(self) -> list[Handle]:
        """Under `_lock`: every open handle, now out of the table."""
        handles = list(self._handles.values())
        self._handles.clear()
        self._waiting.clear()
        return handles


def _fail(handles: list[Handle], error: Callable[[Handle], Exception]) -> None:
    for handle in handles:
        handle.put("failed", error(handle))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit status {code}"
