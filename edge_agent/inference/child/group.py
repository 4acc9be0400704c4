"""Requests that start together on one batched generator (og.Generator with batch_size = N).

On CPU the runtime's og.Engine runs fixed groups of 4; one batched generator of 8 runs the
same 8 requests faster (bench/FIT.md), and holds a cache sized to the work: N × (longest
prompt + largest budget) tokens, not 4 × batch_max_length. It takes one set of search options,
so only requests that ask for the same decoding share one: greedy, or the same sampling
options without a seed of their own; no guidance, no images. Prompts are padded on the right
with the model's pad token, as the runtime's own `encode_batch` does: each member's greedy text
is then its text alone (left padding changed it), as far as the runtime's batched kernels add
up as its single ones do (on a CPU without AVX2 the raw runtime's batched generator parted
from alone after 21 tokens of a story; elsewhere never: tests/test_group.py measures it).
Each member stops on its own (end token, its own budget, cancel, deadline); the generator
steps until no member is left, then goes with its cache."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from edge_agent.errors import AgentError
from edge_agent.inference.child.run import Run
from edge_agent.inference.types import FINISH_LENGTH

Event = tuple[str, int, Any]

# The most requests one batched generator takes. The daemon hands the child at most
# inference.max_batch at once (8 on CPU); past 16, a CPU step is bound by memory anyway.
GROUP_MAX = 16
# A lone run on its own generator joins a group that starts while it has made at most this
# many tokens: its prompt and those tokens are prefilled again in the group (cheap next to
# stepping two generators for the rest of the answer).
ADOPT_TOKENS = 32


def options_key(run: Run) -> tuple[Any, ...] | None:
    """Runs with equal keys may share a batched generator; None: never (guidance, images, a seed)."""
    params = run.work.params
    if run.work.images or params.guidance is not None or params.seed is not None:
        return None
    if not params.sampling:
        return ("greedy",)
    return ("sample", params.temperature, params.top_p, params.top_k)


def cache_tokens(runs: Sequence[Run]) -> int:
    """Tokens of cache a batched generator of these runs holds: every row is as long as the longest
    (a row: the prompt and the tokens generated so far, then what is left of the budget)."""
    longest = max(run.prompt.length + len(run.tokens) for run in runs)
    most = max(run.prompt.budget - len(run.tokens) for run in runs)
    return len(runs) * (longest + most)


def held_bytes(runs: Sequence[Run], kv_bytes: int, logits_bytes: int) -> int:
    """What their batched generator holds at its start: the cache, and the logits of every
    row's prompt while they are read."""
    rows = max(run.prompt.length + len(run.tokens) for run in runs)
    return cache_tokens(runs) * kv_bytes + len(runs) * rows * logits_bytes


def split(runs: Iterable[Run], *, kv_bytes: int, free_bytes: int | None, context: int | None,
          logits_bytes: int = 0) -> tuple[list[list[Run]], list[Run]]:
    """The groups (two members or more, in arrival order) these runs start in, each within
    GROUP_MAX, the model's context and what is left of the memory budget (`free_bytes`, None: no
    budget); and the runs left to start otherwise."""
    buckets: dict[tuple[Any, ...], list[Run]] = {}
    rest: list[Run] = []
    for run in runs:
        key = options_key(run)
        (rest if key is None else buckets.setdefault(key, [])).append(run)
    groups: list[list[Run]] = []
    free = free_bytes
    for bucket in buckets.values():
        current: list[Run] = []
        for run in [*bucket, None]:
            candidate = [*current, run] if run is not None else current
            if run is not None and _fits(candidate, (kv_bytes, logits_bytes), free, context):
                current = candidate
                continue
            if len(current) >= 2:
                groups.append(current)
                if free is not None:
                    free -= held_bytes(current, kv_bytes, logits_bytes)
            else:
                rest.extend(current)
            current = [run] if run is not None else []
    return groups, rest


def _fits(runs: list[Run], sizes: tuple[int, int], free: int | None, context: int | None) -> bool:
    longest = cache_tokens(runs) // len(runs)
    return (len(runs) <= GROUP_MAX and (context is None or longest <= context)
            and (free is None or held_bytes(runs, *sizes) <= free))


class Group:
    """Runs that started together, their batched generator, and the bytes it holds (`held`:
    the prompts' logits go after the first step)."""

    def __init__(self, runs: Sequence[Run], generator: Any, held: int, prefill: int) -> None:
        self.runs = list(runs)  # row i of the generator is runs[i]
        self.generator = generator
        self.held = held
        self._prefill = prefill
        self.live = {run.rid: run for run in runs}

    @classmethod
    def start(cls, engine: Any, runs: Sequence[Run], kv_bytes: int, logits_bytes: int) -> Group:
        """Their batched generator (`engine`: core.Model); raises what the runtime raises."""
        held = held_bytes(runs, kv_bytes, logits_bytes)
        generator = engine.group_generator([(run.prompt, run.tokens) for run in runs], runs[0].work.params)
        for run in runs:
            run.path = "group"
        return cls(runs, generator, held, held - cache_tokens(runs) * kv_bytes)

    def step(self, eos_ids: frozenset[int]) -> list[Event]:
        """One token for every row; text and ends for the live members only."""
        events: list[Event] = []
        if self.generator.is_done():
            for run in list(self.live.values()):
                events.extend(self._end(run, run.finish or FINISH_LENGTH))
            return events
        self.generator.generate_next_token()
        self.held, self._prefill = self.held - self._prefill, 0  # the prompts were read
        tokens = self.generator.get_next_tokens()
        for row, run in enumerate(self.runs):
            if run.rid not in self.live:
                continue  # ended: its row still runs until the others are done
            piece = run.take(int(tokens[row]), eos_ids)
            if piece is not None and run.work.stream:
                events.append(("token", run.rid, piece))
            if piece is None or len(run.pieces) >= run.prompt.budget:
                events.extend(self._end(run, run.finish or FINISH_LENGTH))
        return events

    def drop(self, rid: int) -> Run | None:
        """A member ends here (cancel, deadline); the others go on."""
        return self.live.pop(rid, None)

    def expire(self, now: float) -> list[Run]:
        """The members past their deadline, ended here."""
        return [self.live.pop(run.rid) for run in list(self.live.values()) if run.expired(now)]

    @property
    def done(self) -> bool:
        return not self.live

    def close(self) -> None:
        self.generator = None

    def _end(self, run: Run, finish: str) -> list[Event]:
        del self.live[run.rid]
        return [("done", run.rid, run.result(finish))]


class Groups:
    """The groups running now. Each change returns the bytes it took or freed: the Core keeps
    the one count of what is held."""

    def __init__(self) -> None:
        self._running: list[Group] = []

    def __bool__(self) -> bool:
        return bool(self._running)

    def live(self) -> list[Run]:
        return [run for group in self._running for run in group.live.values()]

    def open(self, engine: Any, runs: Sequence[Run], kv_bytes: int, logits_bytes: int) -> tuple[list[Event], int]:
        try:
            group = Group.start(engine, runs, kv_bytes, logits_bytes)
        except Exception as exc:  # noqa: BLE001 - a failure to start is the group's alone
            text = exc if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            return [("failed", run.rid, text) for run in runs], 0
        self._running.append(group)
        return [], group.held

    def step(self, eos_ids: frozenset[int]) -> tuple[list[Event], int]:
        events: list[Event] = []
        freed = 0
        for group in list(self._running):
            held = group.held
            events.extend(group.step(eos_ids))
            freed += held - group.held + self._close_if_done(group)
        return events, freed

    def cancel(self, rid: int) -> tuple[Run | None, int]:
        for group in self._running:
            run = group.drop(rid)
            if run is not None:
                return run, self._close_if_done(group)
        return None, 0

    def expire(self, now: float) -> tuple[list[Run], int]:
        expired: list[Run] = []
        freed = 0
        for group in list(self._running):
            expired.extend(group.expire(now))
            freed += self._close_if_done(group)
        return expired, freed

    def clear(self) -> None:
        self._running.clear()

    def _close_if_done(self, group: Group) -> int:
        """A group whose members all ended goes, and what it held with it."""
        if not group.done:
            return 0
        self._running.remove(group)
        group.close()
        return group.held
