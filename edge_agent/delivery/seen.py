"""The request ids seen within the de-duplication window, in memory, so that admitting a request
needs no disk. It mirrors the store's `seen` table as of the writes queued so far: loaded from
the store at start, then changed here first and written there by the delivery-writer thread.

Not thread-safe: its owner guards it with a lock (held for memory work only)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

IN_PROGRESS, ANSWERED = "in_progress", "answered"


class SeenIndex:
    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        # request id -> (first seen, answered), oldest first: expiry pops from the front
        self._ids: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    def load(self, answered: Iterable[tuple[str, float]]) -> None:
        """Ids answered before (by a previous process), with when each was first seen."""
        for request_id, created in sorted(answered, key=lambda item: item[1]):
            self._ids[request_id] = (created, True)

    def state(self, request_id: str) -> str | None:
        """IN_PROGRESS, ANSWERED, or None: not seen within the window."""
        cutoff = self._clock() - self._window_s
        while self._ids:  # the same rule as the store's: first seen before the window, gone
            oldest, (created, _) = next(iter(self._ids.items()))
            if created >= cutoff:
                break
            del self._ids[oldest]
        entry = self._ids.get(request_id)
        if entry is None or entry[0] < cutoff:  # a clock set back can leave one out of order
            return None
        return ANSWERED if entry[1] else IN_PROGRESS

    def begin(self, request_id: str) -> None:
        """Seen now, for the first time within the window: in progress."""
        self._ids.pop(request_id, None)
        self._ids[request_id] = (self._clock(), False)

    def answered(self, request_id: str) -> None:
        """Its answer is on its way to the store; first seen stays what it was."""
        entry = self._ids.get(request_id)
        if entry is None:
            self._ids[request_id] = (self._clock(), True)
        else:
            self._ids[request_id] = (entry[0], True)

    def forget(self, request_id: str, *, answered_too: bool = False) -> None:
        """Refused or passed on before running: a re-send runs. An answered id stays answered
        unless `answered_too` (its answer was never stored)."""
        entry = self._ids.get(request_id)
        if entry is not None and (answered_too or not entry[1]):
            del self._ids[request_id]

    def __len__(self) -> int:
        return len(self._ids)
