"""The model in a child process (`worker.py`), behind the same interface as OrtGenaiEngine.

Why a process: ONNX Runtime GenAI keeps the GIL inside its calls (7 ms a token on SmolLM2,
60 ms for a prompt), so generation in a thread of the daemon stalls the MQTT thread and `busy`
answers came seconds late under overload (bench/HOSTILE.md). And the runtime ends its process
on some inputs; now that ends the child only: the request gets `internal`, a new child loads
the model, the daemon goes on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge_agent.errors import AgentError, ErrorCode, ModelLoadError, Timeout
from edge_agent.inference.engine import WARMUP_TOKENS, Generation, GenerationParams, read_genai_config
from edge_agent.inference.worker import LoadedInfo, LoadSpec
from edge_agent.log import get_logger

log = get_logger("inference")
POLL_S = 0.25
# A generation checks its deadline between tokens; one stuck inside a single call this long
# past its deadline is ended with its process.
STUCK_GRACE_S = 10.0
STOP_WAIT_S = 5.0


class EngineProcess:
    """One loaded model in a child process. Like OrtGenaiEngine, for one caller at a time."""

    def __init__(self, folder: Path, provider: str = "auto", fallback: Sequence[str] = ("cpu",),
                 provider_options: Mapping[str, object] | None = None, *, log_level: str = "info",
                 log_format: str = "auto", longest_s: float | None = None,
                 stuck_grace_s: float = STUCK_GRACE_S) -> None:
        self.folder = folder
        # A generation with no deadline of its own is stuck once it runs longer than this
        # (limits.max_timeout_s) plus the grace: ended here, before the systemd watchdog would
        # restart the whole daemon for it.
        self.longest_s = longest_s
        self.stuck_grace_s = stuck_grace_s
        self._spec = LoadSpec(str(folder), provider, tuple(fallback), dict(provider_options or {}),
                              log_level, log_format)
        model_section = read_genai_config(folder).get("model", {})  # fails early on a bad folder
        self.name = folder.name
        self.supports_images = model_section.get("type") == "phi3v" or "vision" in model_section
        self.context_length: int | None = None
        self.provider, self.provider_reason = "", ""
        self.provider_attempts: tuple[Any, ...] = ()
        self.crashes = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def load(self) -> None:
        with self._lock:
            self._start()

    def warm_up(self) -> Generation:
        return self.generate(({"role": "user", "content": "Hello"},), GenerationParams(WARMUP_TOKENS))

    def generate(self, messages: Sequence[dict[str, str]], params: GenerationParams,
                 deadline: float | None = None, images: Sequence[bytes] = ()) -> Generation:
        with self._lock:
            if self._closed:
                raise AgentError("the model was unloaded", ErrorCode.UNAVAILABLE)
            if self._conn is None:  # the last child died and could not be replaced then
                self._start()
            assert self._conn is not None
            limit = deadline
            if limit is None and self.longest_s is not None:
                limit = time.monotonic() + self.longest_s
            try:
                self._conn.send(("generate", list(messages), params, deadline, list(images)))
                reply = self._wait(limit)
            except (EOFError, OSError):
                reply = None
            if reply is None:
                raise self._replace_dead_child()
            kind, value = reply
            if kind == "ok":
                return value  # type: ignore[no-any-return]
            if kind == "error":
                raise value
            raise RuntimeError(value)  # an unexpected exception in the child, by its text

    def close(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop the child once the running generation (if any) is over, or after `wait_s`:
        then that generation fails `unavailable`."""
        self._closed = True
        if self._lock.acquire(timeout=wait_s):
            try:
                self._stop_child()
            finally:
                self._lock.release()
            return
        proc = self._proc
        if proc is not None:
            proc.kill()  # the generating thread sees it die and, closed, starts no other

    # --- the child -------------------------------------------------------------------------
    def _start(self) -> None:
        """Start a child and load the model there; raises ModelLoadError as OrtGenaiEngine does."""
        ours, theirs = socket.socketpair()
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.inference.worker", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"cannot start the inference process: {exc}") from exc
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(("load", self._spec))
            reply = self._wait(None)
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
        log.info("inference.process_started", pid=self._proc.pid, model=self.name, provider=self.provider,
                 ms=round((time.monotonic() - started) * 1000, 1))

    def _wait(self, deadline: float | None) -> tuple[str, Any] | None:
        """The child's reply; None if it died. Past `deadline` by the grace: end it, Timeout."""
        assert self._conn is not None and self._proc is not None
        while not self._conn.poll(POLL_S):
            if self._proc.poll() is not None and not self._conn.poll(0):
                return None
            if deadline is not None and time.monotonic() > deadline + self.stuck_grace_s:
                log.error("inference.stuck", pid=self._proc.pid, past_deadline_s=self.stuck_grace_s)
                self._stop_child(kill=True)
                raise Timeout("generation stuck past its deadline; the model is loaded again")
        return self._conn.recv()  # type: ignore[no-any-return]

    def _replace_dead_child(self) -> AgentError:
        """The child died in a generation (the runtime exited, was killed, ran out of memory):
        that request fails, a new child loads the model for the next."""
        code = self._stop_child()
        if self._closed:
            return AgentError("the model was unloaded", ErrorCode.UNAVAILABLE)
        self.crashes += 1
        log.error("inference.process_died", exit=_exit_text(code), model=self.name)
        try:
            self._start()
        except (ModelLoadError, AgentError) as exc:
            log.error("inference.restart_failed", error=str(exc))  # the next request tries again
        return AgentError(f"the inference process died ({_exit_text(code)}); it was restarted",
                          ErrorCode.INTERNAL)

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
