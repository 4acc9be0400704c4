"""Prompt-prefix reuse on the single path: the caches of the last finished generators, kept so
that a new prompt sharing a long token prefix with one of them continues from it
(`rewind_to(common)` + `append_tokens(rest)`) instead of prefilling it again (FACTS.md: 41 ms
against 1,304 ms for 369 shared tokens on SmolLM2).

Only where the answer is then the same as from scratch: greedy, no guidance (a grammar's state
cannot be rewound), no images. The runtime cannot do it on the batching engine (its prefix
caching is for paged CUDA models only) nor for image inputs (the processor's embeddings are not
tokens the cache could be matched on).
Measured (SmolLM2, 0.18): appending the last prompt token alone after a rewind changed a greedy
answer at its 8th token (a one-row matmul rounds otherwise than the prompt's); appending 2, 3
or 6 gave the same 32 tokens in all 30 cases tried (10 questions): the rest appended is never
shorter than MIN_APPEND. A kept generator sized larger than the new request answers the same.
The caller (core.Core) counts each kept cache as held memory and evicts the least recently
used one whenever a request needs room.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.inference.types import GenerationParams
from edge_agent.log import get_logger

log = get_logger("inference")

MAX_KEPT = 4  # finished generators kept at most (each holds its cache; within the budget too)
MIN_COMMON = 16  # shared tokens worth a rewind: below, a fresh generator costs about the same
MIN_APPEND = 2  # tokens appended after a rewind at least (see above)
# A reusable generator's max_length: what it needs plus HEADROOM, rounded up to BUCKET, so that
# a slightly longer prompt (another question after the same system prompt) still fits in it.
HEADROOM, BUCKET = 32, 64
# A request the batching engine would take goes to its own generator instead when a kept cache
# gives it this many prompt tokens: a long prefill saved outweighs sharing the batch (bench/FIT.md:
# first token in 63 ms instead of 17 s, the rest of the burst done sooner), while a short shared
# head (a chat template's default system prompt) does not make every request leave the batch.
PREFIX_OVER_BATCH = 256


def reusable(params: GenerationParams, ids: Any) -> bool:
    """Whether a request's answer is the same on a rewound generator as on a fresh one."""
    return ids is not None and not params.sampling and params.guidance is None


def reusable_length(length: int, context_length: int | None, kv_bytes: int = 0, spare: int | None = None) -> int:
    """A reusable generator's max_length for `length` tokens: HEADROOM more, rounded up to
    BUCKET, within the context, where that takes at most half of the cache budget left
    (`spare`; None: no budget): a tight budget keeps its room for the next request."""
    rounded = -(-(length + HEADROOM) // BUCKET) * BUCKET
    rounded = min(rounded, context_length) if context_length else rounded
    return rounded if spare is None or rounded * kv_bytes <= spare // 2 else length


@dataclass
class Kept:
    generator: Any
    tokens: Any  # np.int32 array, whose cache it holds: the prompt and the generated tokens but the last
    max_length: int
    bytes: int  # counted as held by the Core


@dataclass
class Hit:
    generator: Any  # rewound, the rest of the prompt appended
    cached: int  # prompt tokens taken from the cache
    max_length: int
    bytes: int


class PrefixCache:
    """The kept generators, least recently used first. Owned by the child's main loop."""

    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        self._max_kept = max_kept
        self._kept: OrderedDict[int, Kept] = OrderedDict()
        self._serial = 0

    @property
    def held_bytes(self) -> int:
        return sum(kept.bytes for kept in self._kept.values())

    def __len__(self) -> int:
        return len(self._kept)

    def best(self, ids: Any, length_needed: int) -> tuple[int, int] | None:
        """(key, shared tokens) of the kept generator sharing the longest prefix with `ids`,
        large enough for `length_needed` tokens; None below MIN_COMMON."""
        found: tuple[int, int] | None = None
        for key, kept in self._kept.items():
            if kept.max_length < length_needed:
                continue
            common = min(_common_prefix(kept.tokens, ids), len(ids) - MIN_APPEND)
            if common >= MIN_COMMON and (found is None or common >= found[1]):
                found = (key, common)
        return found

    def take(self, ids: Any, length_needed: int) -> tuple[Hit | None, int]:
        """The best kept generator, rewound and fed the rest of `ids`; it is no longer kept.
        With it, the bytes of one the runtime refused to rewind (dropped: a fresh one is made)."""
        found = self.best(ids, length_needed)
        if found is None:
            return None, 0
        key, common = found
        kept = self._kept.pop(key)
        try:
            kept.generator.rewind_to(common)
            kept.generator.append_tokens(ids[common:])
        except Exception as exc:  # noqa: BLE001 - ORT GenAI raises plain RuntimeError; reuse is only a saving
            log.warning("inference.prefix_refused", error=str(exc)[:200], common=common)
            return None, kept.bytes
        return Hit(kept.generator, common, kept.max_length, kept.bytes), 0

    def keep(self, generator: Any, max_length: int, held: int) -> int:
        """Keep a finished generator; returns the bytes of those evicted for the cap."""
        tokens = np.asarray(generator.get_sequence(0), dtype=np.int32)[:-1]  # the last one has no cache yet
        self._serial += 1
        self._kept[self._serial] = Kept(generator, tokens, max_length, held)
        freed = 0
        while len(self._kept) > self._max_kept:
            freed += self.evict()
        return freed

    def evict(self) -> int:
        """Drop the least recently used one; returns its bytes (0: none kept)."""
        if not self._kept:
            return 0
        _, kept = self._kept.popitem(last=False)
        return kept.bytes

    def clear(self) -> None:
        self._kept.clear()


def _common_prefix(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
