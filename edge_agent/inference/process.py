"""The daemon's side of the inference child (`worker.py`): requests go in with ids, events come
back and one reader thread routes them to each request's `Handle`.

Why a process: ONNX Runtime GenAI keeps the GIL inside its calls (7 ms a token on SmolLM2,
60 ms for a prompt), so generation in a thread of the daemon stalled the MQTT thread. And the
runtime ends its process on some inputs; now that ends the child only: every request in flight
gets `internal`, a new child loads the model, the daemon goes on. This module imports neither
onnxruntime_genai nor numpy: the daemon stays small.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edge_agent.errors import AgentError, Internal, ModelLoadError, Timeout, Unavailable
from edge_agent.inference.types import (DEFAULT_BATCH_MAX_LENGTH, DEFAULT_BATCH_WAIT_S, WARMUP_TOKENS,
                                        Generation, GenerationParams, Work, read_genai_config,
                                        takes_images)
from edge_agent.inference.child.worker import LoadedInfo, LoadSpec
from edge_agent.log import get_logger

log = get_logger("inference")
POLL_S = 0.25
# The child checks deadlines between tokens; a request stuck inside a single call this long
# past its deadline is ended with the child.
STUCK_GRACE_S = 10.0
STOP_WAIT_S = 5.0


class Handle:
    """One request in the child: its text as it comes (`on_token`) and its end."""

    def __init__(self, rid: int, limit: float | None, on_token: Callable[[str], None] | None) -> None:
        self.rid = rid
        self.limit = limit  # past this (plus the grace) it is stuck
        self._on_token = on_token
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancel: Callable[[int], None] | None = None

    def put(self, kind: str, value: Any) -> None:
        self._events.put((kind, value))

    def result(self) -> Generation:
        """Wait for the end, passing text on as it comes; raises what the request failed with."""
        while True:
            kind, value = self._events.get()
            if kind == "token":
                if self._on_token is not None:
                    self._on_token(value)
                continue
            if kind == "done":
                return value  # type: ignore[no-any-return]
            if isinstance(value, AgentError):
                raise value
            raise RuntimeError(value)  # an unexpected exception in the child, by its text

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel(self.rid)


class EngineProcess:
    """One loaded model in a child process; any number of callers, each with its own handle."""

    def __init__(self, folder: Path, provider: str = "auto", fallback: Sequence[str] = ("cpu",),
                 provider_options: Mapping[str, object] | None = None, *, log_level: str = "info",
                 log_format: str = "auto", longest_s: float | None = None,
                 stuck_grace_s: float = STUCK_GRACE_S, batching: bool = True,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
                 batch_max_length: int = DEFAULT_BATCH_MAX_LENGTH) -> None:
        self.folder = folder
        # A request with no deadline of its own is stuck once it runs longer than this
        # (limits.max_timeout_s) plus the grace: ended here, before the systemd watchdog would
        # restart the whole daemon for it.
        self.longest_s = longest_s
        self.stuck_grace_s = stuck_grace_s
        self._spec = LoadSpec(str(folder), provider, tuple(fallback), dict(provider_options or {}),
                              log_level, log_format, batching, batch_wait_s, batch_max_length)
        self.name = folder.name
        self.supports_images = takes_images(read_genai_config(folder))  # fails early on a bad folder
        self.context_length: int | None = None
        self.provider, self.provider_reason = "", ""
        self.provider_attempts: tuple[Any, ...] = ()
        self.batching, self.batching_reason, self.batch_group = "off", "not loaded", 1
        self.crashes = 0
        self._lock = threading.RLock()  # the child, its socket and the handles
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._handles: dict[int, Handle] = {}
        self._ids = itertools.count(1)
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def load(self) -> None:
        with self._lock:
            self._start()

    def warm_up(self) -> Generation:
        """A short generation; with batching, a full group at once: the batch path is warm and
        its cache (the runtime sizes it to the largest group it has run) is all there at
        `ready`, instead of growing under the first burst."""
        work = Work(({"role": "user", "content": "Hello"},), GenerationParams(WARMUP_TOKENS))
        handles = [self.submit(work) for _ in range(self.batch_group if self.batching != "off" else 1)]
        return [handle.result() for handle in handles][0]

    def generate(self, messages: Sequence[dict[str, str]], params: GenerationParams,
                 deadline: float | None = None, images: Sequence[bytes] = ()) -> Generation:
        return self.submit(Work(tuple(messages), params, deadline, tuple(images))).result()

    def submit(self, work: Work, on_token: Callable[[str], None] | None = None) -> Handle:
        """Hand a request to the child; its events reach the returned handle."""
        with self._lock:
            if self._closed:
                raise Unavailable("the model was unloaded")
            if self._conn is None:  # the last child died and could not be replaced then
                self._start()
            assert self._conn is not None
            limit = work.deadline
            if limit is None and self.longest_s is not None:
                limit = time.monotonic() + self.longest_s
            handle = Handle(next(self._ids), limit, on_token)
            handle._cancel = self.cancel
            self._handles[handle.rid] = handle
            try:
                self._conn.send(("submit", handle.rid, work))
            except (OSError, ValueError):
                pass  # the reader sees the child gone and fails the handle
            return handle

    def cancel(self, rid: int) -> None:
        with self._lock:
            if rid in self._handles and self._conn is not None:
                try:
                    self._conn.send(("cancel", rid))
                except (OSError, ValueError):
                    pass

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop the child once the requests in flight are done, or after `wait_s`: then those
        fail `unavailable`."""
        self._closed = True
        deadline = time.monotonic() + wait_s
        while self._handles and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._fail_all(lambda handle: Unavailable("the model was unloaded"))
            self._stop_child()

    # --- the child -------------------------------------------------------------------------
    def _start(self) -> None:
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
        self._proc, self._conn = proc, Connection(ours.detach())
        try:
            self._conn.send(("load", self._spec))
            reply = self._conn.recv() if self._wait_readable(proc) else None
        except (EOFError, OSError):
            reply = None
        if reply is None or reply[0] != "loaded":
            code = self._stop_child()
            if reply is not None and reply[0] == "error":
                raise reply[1]
            raise ModelLoadError(f"the inference process ended while loading {self.folder} "
                                 f"({_exit_text(code)})")
        info: LoadedInfo = reply[1]
        self.provider, self.provider_reason = info.provider, info.provider_reason
        self.provider_attempts, self.context_length = info.provider_attempts, info.context_length
        self.supports_images = info.supports_images
        self.batching, self.batching_reason, self.batch_group = info.batching, info.batching_reason, info.batch_group
        threading.Thread(target=self._read, args=(proc, self._conn), name="inference-reader", daemon=True).start()
        log.info("inference.process_started", pid=proc.pid, model=self.name, provider=self.provider,
                 batching=self.batching, ms=round((time.monotonic() - started) * 1000, 1))

    def _wait_readable(self, proc: subprocess.Popen[bytes]) -> bool:
        assert self._conn is not None
        while not self._conn.poll(POLL_S):
            if proc.poll() is not None and not self._conn.poll(0):
                return False
        return True

    def _read(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """Route the child's events until it dies or is replaced; then fail what it had."""
        while True:
            try:
                ready = conn.poll(POLL_S)
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                break
            if message is not None:
                self._route(message[1])
            elif proc.poll() is not None:
                break
            if self._stuck(proc):
                return
        with self._lock:
            if self._proc is proc:
                self._replace_dead_child()

    def _route(self, events: list[tuple[str, int, Any]]) -> None:
        for kind, rid, value in events:
            handle = self._handles.get(rid)
            if handle is None:
                continue
            if kind != "token":
                with self._lock:
                    self._handles.pop(rid, None)
            handle.put(kind, value)

    def _stuck(self, proc: subprocess.Popen[bytes]) -> bool:
        """A request past its limit by the grace is stuck in one runtime call: end the child."""
        now = time.monotonic()
        stuck = [h for h in list(self._handles.values())
                 if h.limit is not None and now > h.limit + self.stuck_grace_s]
        if not stuck:
            return False
        with self._lock:
            if self._proc is not proc:
                return True
            log.error("inference.stuck", pid=proc.pid, requests=len(stuck), past_deadline_s=self.stuck_grace_s)
            self._stop_child(kill=True)
            stuck_ids = {h.rid for h in stuck}
            self._fail_all(lambda h: Timeout("generation stuck past its deadline; the model is loaded again")
                           if h.rid in stuck_ids else
                           Internal("the inference process was restarted (another request was stuck)"))
            self._restart()
        return True

    def _replace_dead_child(self) -> None:
        """The child died (the runtime exited, was killed, ran out of memory): every request it
        had fails, a new child loads the model for the next."""
        code = self._stop_child()
        if self._closed:
            self._fail_all(lambda handle: Unavailable("the model was unloaded"))
            return
        self.crashes += 1
        log.error("inference.process_died", exit=_exit_text(code), model=self.name, in_flight=len(self._handles))
        self._fail_all(lambda handle: Internal(
            f"the inference process died ({_exit_text(code)}); a new one is loading the model"))
        self._restart()

    def _restart(self) -> None:
        if self._closed:
            return
        try:
            self._start()
        except (ModelLoadError, AgentError) as exc:
            log.error("inference.restart_failed", error=str(exc))  # the next request tries again

    def _fail_all(self, error: Callable[[Handle], AgentError]) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.put("failed", error(handle))

    def _stop_child(self, *, kill: bool = False) -> int | None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is not None and kill:
            proc.kill()
        if conn is not None and not kill:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        code = None
        if proc is not None:
            try:
                code = proc.wait(STOP_WAIT_S if conn is not None else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if conn is not None:
            conn.close()
        return code


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit status {code}"
