"""A request's progress in the inference child, and what it starts from: its prepared prompt
(`Prompt`), the runtime's batching offer (`Batching`) and the run itself (`Run`: its text so
far, its timings, and what each path holds of it). Shared by the scheduler (core.py) and its
paths (group.py, engine_runs.py); imports nothing of the runtime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import AgentError
from edge_agent.inference.types import FINISH_STOP, Generation, Work


@dataclass(frozen=True)
class Prompt:
    """A request's prompt, ready for a generator: token ids, or processor inputs with images."""

    ids: Any  # np.int32 array; None with images
    inputs: Any  # the multimodal processor's output; None without images
    length: int
    budget: int  # tokens it may generate: max_new_tokens within the context


@dataclass(frozen=True)
class Batching:
    """What the runtime's og.Engine offers for this model: `mode` is "dynamic" (paged attention:
    requests join and leave at every step), "static" (fixed groups; newcomers wait for the
    running group) or "off"; `reason` says why in words."""

    mode: str
    group_size: int
    max_length: int
    reason: str


class Run:
    """One request's progress: its text so far and its timings."""

    def __init__(self, rid: int, work: Work, prompt: Prompt, stream: Any, path: str, received: float) -> None:
        self.rid, self.work, self.prompt, self.path = rid, work, prompt, path
        self.received = received
        self.pieces: list[str] = []
        self.tokens: list[int] = []  # the ids of the pieces: a group that adopts it prefills them
        self.ttft_ms: float | None = None
        self._stream = stream
        self.finish: str | None = None  # set when it ended
        self.failure: AgentError | None = None  # set when it ended in error (deadline)
        self.generator: Any = None  # single path
        self.request: Any = None  # batch path: og.Request and its turn
        self.turn: Any = None
        self.lone = False  # came to an idle engine after a quiet spell: waits for no company
        self.max_length = prompt.length + prompt.budget  # single path: its generator's
        self.reserved = 0  # single path: bytes of cache counted as held for it
        self.logits = 0  # single path: bytes of its prompt's logits, counted as held until its first token
        self.cached = 0  # prompt tokens continued from a kept cache

    def take(self, token: int, eos_ids: frozenset[int]) -> str | None:
        """The text a new token adds; None once it is the end token."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.monotonic() - self.received) * 1000
        if token in eos_ids:
            self.finish = FINISH_STOP
            return None
        piece = self._stream.decode(token)
        self.tokens.append(token)
        self.pieces.append(piece)
        return piece

    def result(self, finish: str) -> Generation:
        return Generation(text="".join(self.pieces), finish_reason=finish, prompt_tokens=self.prompt.length,
                          completion_tokens=len(self.pieces), cached_tokens=self.cached, ttft_ms=self.ttft_ms,
                          generate_ms=(time.monotonic() - self.received) * 1000, path=self.path)

    def expired(self, now: float) -> bool:
        return self.work.deadline is not None and now > self.work.deadline
