"""One inference child as the daemon talks to it: the process and our end of its socket
(`Child`, with its writer thread), one request's end of it (`Handle`), and how a message is
packed. `process.LocalInference` owns the children and routes their events to the handles."""

from __future__ import annotations

import queue
import subprocess
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

from edge_agent.inference.types import Generation

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
            if isinstance(value, Exception):  # AgentError; ModelLoadError when no child could load
                raise value
            raise RuntimeError(value)  # an unexpected exception in the child, by its text

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel(self.rid)


class Child:
    """One inference process and our end of its socket. Messages to it are pickled by the
    caller and written by its own writer thread, in the order they were sent: a sender never
    waits for the socket, and a dead child's writer just stops."""

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.proc, self.conn = proc, conn
        # Unbounded, but holds at most the messages of the requests in flight (bounded upstream)
        # and a cancel each, until the reader sees the child gone.
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="inference-writer", daemon=True)
        self._writer.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, data: bytes) -> None:
        """`data` from `_pack`."""
        self._outbox.put(data)

    def _write(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the child is gone: its reader fails what it had

    def stop(self, *, kill: bool = False) -> int | None:
        """End the process (asked to stop, or killed), then close the socket; its exit status."""
        if kill:
            self.proc.kill()
        else:
            self.send(pack(("stop",)))
        self._outbox.put(None)
        try:
            code = self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._writer.join(STOP_WAIT_S)  # a write to the ended process fails at once
        self.conn.close()
        return code


def pack(message: tuple[Any, ...]) -> bytes:
    """Pickled as Connection.send does: on the sender's thread, so a message that cannot be
    pickled fails there."""
    return bytes(ForkingPickler.dumps(message))
