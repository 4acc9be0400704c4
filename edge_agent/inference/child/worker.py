"""The inference child process: loads the model and generates every request the daemon hands
it, several at once (core.py). Run as `python -m edge_agent.inference.child.worker FD PARENT_PID`, FD
a socket inherited from the parent, carrying pickled messages both ways:

parent -> child: ("load", LoadSpec), ("submit", rid, Work), ("cancel", rid), ("stop",)
child -> parent: ("loaded", LoadedInfo) or ("error", ModelLoadError|AgentError) once, then
                 ("events", [("token", rid, text) | ("done", rid, Generation) |
                             ("failed", rid, AgentError | "text of an unexpected exception")])
(LoadSpec, LoadedInfo and Work are the boundary types of `edge_agent.inference.types`.)
A reader thread takes the parent's messages; only the main thread touches the runtime (og.Engine
must be called from the thread that made it) and only it writes to the socket.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from edge_agent import log as logging_setup
from edge_agent.errors import AgentError, ModelLoadError
from edge_agent.inference.types import LoadedInfo, LoadSpec
from edge_agent.log import get_logger

log = get_logger("inference")

PARENT_CHECK_S = 1.0
_GONE = ("stop",)


def _exit_with_parent(parent_pid: int) -> None:
    """A SIGKILLed daemon cannot stop us: leave when we are handed to another parent."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(PARENT_CHECK_S)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _read(conn: Connection, inbox: queue.SimpleQueue[tuple[Any, ...]]) -> None:
    """The parent's messages, in order; its going away reads as a stop."""
    try:
        while True:
            message = conn.recv()
            inbox.put(message)
            if message[0] == "stop":
                return
    except (EOFError, OSError):
        inbox.put(_GONE)


def serve(conn: Connection) -> None:
    from edge_agent.inference.child.core import Core  # here: the parent never imports the runtime
    from edge_agent.inference.child.engine import OrtGenaiEngine

    kind, spec = conn.recv()
    if kind != "load":
        return
    logging_setup.configure(spec.log_level, spec.log_format)
    from pathlib import Path

    engine = OrtGenaiEngine(Path(spec.folder), spec.provider, spec.fallback, spec.provider_options,
                            batching=spec.batching, batch_max_length=spec.batch_max_length)
    before = _resident_bytes()
    try:
        engine.load()
    except (ModelLoadError, AgentError) as exc:
        conn.send(("error", exc))
        return
    loaded = max(0, _resident_bytes() - before)
    b = engine.batching
    conn.send(("loaded", LoadedInfo(engine.provider, engine.provider_reason, engine.provider_attempts,
                                    engine.context_length, engine.supports_images,
                                    b.mode, b.reason, b.group_size, loaded)))
    core = Core(engine, spec.batch_wait_s, cache_budget_bytes=_cache_budget(spec, loaded),
                kv_bytes_per_token=spec.kv_bytes_per_token, logits_bytes_per_token=spec.logits_bytes_per_token,
                prefix_cache=spec.prefix_cache)
    inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(conn, inbox), name="child-reader", daemon=True).start()
    _loop(conn, core, inbox)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0  # not Linux: the plan's figures stand


def _cache_budget(spec: LoadSpec, loaded: int) -> int | None:
    """The caches' budget less what the load took beyond the plan (the file size is a guess)."""
    over = loaded - spec.planned_load_bytes
    log.info("memory.loaded", loaded_mb=round(loaded / 2**20, 1), planned_mb=round(spec.planned_load_bytes / 2**20, 1))
    if spec.cache_budget_bytes is None or over <= 0:
        return spec.cache_budget_bytes
    return max(0, spec.cache_budget_bytes - over)


def _loop(conn: Connection, core: Any, inbox: queue.SimpleQueue[tuple[Any, ...]]) -> None:
    while True:
        events: list[Any] = []
        wait = core.wait_time()
        try:
            # Idle: sleep until a message comes. Busy: take what came, then step.
            message: tuple[Any, ...] | None = inbox.get(timeout=wait) if wait != 0.0 else inbox.get_nowait()
        except queue.Empty:
            message = None
        while message is not None:
            if message[0] == "stop":
                return
            events.extend(_handle(core, message))
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                message = None
        try:
            events.extend(core.step())
        except Exception as exc:  # noqa: BLE001 - the runtime failed with no one request to blame
            events.extend(core.fail_all(f"{type(exc).__name__}: {exc}"))
        if events:
            conn.send(("events", events))


def _handle(core: Any, message: tuple[Any, ...]) -> list[Any]:
    kind, rid = message[0], message[1]
    try:
        if kind == "submit":
            return core.submit(rid, message[2])  # type: ignore[no-any-return]
        if kind == "cancel":
            return core.cancel(rid)  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which answers `internal`
        return [("failed", rid, f"{type(exc).__name__}: {exc}")]
    return []


def main(argv: list[str]) -> int:
    # The daemon decides when we stop: a Ctrl-C or a SIGTERM to the whole process group must not
    # end a generation the daemon is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent_pid = int(argv[2])
    if os.getppid() != parent_pid:
        return 0
    _exit_with_parent(parent_pid)
    conn = Connection(int(argv[1]))
    try:
        serve(conn)
    except (EOFError, OSError, BrokenPipeError):
        pass  # the parent went away
    return 0


if __name__ == "__main__":
    # Through the imported module, so that what we pickle names edge_agent.inference.child.worker
    # classes, not __main__ ones the parent cannot find.
    from edge_agent.inference.child import worker

    sys.exit(worker.main(sys.argv))
