"""The inference child process: loads the model and generates, one request at a time, for the
daemon that started it (`remote.py`). Run as `python -m edge_agent.inference.worker FD`, FD a
socket inherited from the parent, carrying pickled messages both ways:

parent -> child: ("load", LoadSpec), ("generate", messages, params, deadline, images), ("stop",)
child -> parent: ("loaded", LoadedInfo), ("ok", Generation), ("error", AgentError|ModelLoadError),
                 ("failed", "text of an unexpected exception")
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from edge_agent import log as logging_setup
from edge_agent.errors import AgentError, ModelLoadError

PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class LoadSpec:
    folder: str
    provider: str
    fallback: tuple[str, ...]
    provider_options: dict[str, Any]
    log_level: str
    log_format: str


@dataclass(frozen=True)
class LoadedInfo:
    provider: str
    provider_reason: str
    provider_attempts: tuple[Any, ...]
    context_length: int | None
    supports_images: bool


def _exit_with_parent(parent_pid: int) -> None:
    """A SIGKILLed daemon cannot stop us: leave when we are handed to another parent."""
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(PARENT_CHECK_S)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(conn: Connection) -> None:
    from edge_agent.inference.engine import OrtGenaiEngine  # here: the parent never needs ORT

    kind, spec = conn.recv()
    if kind != "load":
        return
    logging_setup.configure(spec.log_level, spec.log_format)
    from pathlib import Path

    engine = OrtGenaiEngine(Path(spec.folder), spec.provider, spec.fallback, spec.provider_options)
    try:
        engine.load()
    except (ModelLoadError, AgentError) as exc:
        conn.send(("error", exc))
        return
    conn.send(("loaded", LoadedInfo(engine.provider, engine.provider_reason, engine.provider_attempts,
                                    engine.context_length, engine.supports_images)))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "generate":
            return
        _, messages, params, deadline, images = message
        try:
            reply: tuple[str, Any] = ("ok", engine.generate(messages, params, deadline, images))
        except (AgentError, ModelLoadError) as exc:
            reply = ("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which answers `internal`
            reply = ("failed", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


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
    # Through the imported module, so that what we pickle names edge_agent.inference.worker
    # classes, not __main__ ones the parent cannot find.
    from edge_agent.inference import worker

    sys.exit(worker.main(sys.argv))
