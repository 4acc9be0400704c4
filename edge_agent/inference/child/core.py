"""The child's scheduler: every request in flight advances a token per turn of the loop.

Two paths, chosen per request (never changing what it asked for):
- single: a generator of its own (og.Generator). Images, a `seed` where the batch refuses it,
  prompts longer than the batch's cache, runtimes without the engine, and a request that finds
  nothing else to share with (alone it is fastest here: FACTS.md).
- group: requests that start together with the same decoding options, on one batched
  generator (group.py): faster than og.Engine's fixed groups of 4 on CPU, its cache sized to them.
- batch: the runtime's og.Engine. "dynamic" (paged attention) takes newcomers at any step;
  "static" (CPU) runs fixed groups, so a request that finds the engine idle waits `wait_s` for
  others to arrive and start with it (as a group where it can); later ones, and what a group
  cannot take (guidance, other options), go to og.Engine.
A request on a generator of its own (or a group) holds a cache of prompt + budget tokens, and its
prompt's logits until the first token: with a memory budget it starts only when that fits in
what is left (requests wait in order, so none is passed for ever); one that could never fit
fails at once (TooLarge).
With prefix reuse (prefix.py), finished single generators are kept, their caches still counted
as held, until a request continues one or needs their room (least recently used first); a
request that shares a long prefix with one goes to the single path.
Events out: ("token", rid, text), ("done", rid, Generation), ("failed", rid, AgentError|str),
("memory", 0, bytes of request caches held now).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import onnxruntime_genai as og

from edge_agent.errors import AgentError, Timeout, TooLarge
from edge_agent.inference.child.engine_runs import EngineRuns
from edge_agent.inference.child.group import ADOPT_TOKENS, GROUP_MAX, Groups, split
from edge_agent.inference.child.prefix import PREFIX_OVER_BATCH, PrefixCache, reusable, reusable_length
from edge_agent.inference.child.run import Batching, Prompt, Run
from edge_agent.inference.types import (DEFAULT_BATCH_WAIT_S, FINISH_CANCELLED, FINISH_LENGTH, Generation,
                                        GenerationParams, Work)
from edge_agent.log import get_logger

log = get_logger("inference")
Event = tuple[str, int, Any]


class Model(Protocol):
    """What the Core needs of a loaded model (engine.OrtGenaiEngine, which imports this module)."""

    og_engine: Any  # og.Engine when batching is on, else None
    batching: Batching
    eos_ids: frozenset[int]
    context_length: int | None
    can_group: bool  # batched generators (group.py) for requests that start together

    def prepare(self, work: Work) -> Prompt: ...
    def token_stream(self) -> Any: ...
    def fits_batch(self, work: Work, prompt: Prompt) -> bool: ...
    def generator(self, prompt: Prompt, params: GenerationParams, max_length: int) -> Any: ...
    def batch_turn(self, prompt: Prompt, params: GenerationParams) -> tuple[Any, Any]: ...
    def group_generator(self, rows: list[tuple[Prompt, list[int]]], params: GenerationParams) -> Any: ...


class Core:
    def __init__(self, engine: Model, wait_s: float = DEFAULT_BATCH_WAIT_S, *,
                 cache_budget_bytes: int | None = None, kv_bytes_per_token: int = 0,
                 logits_bytes_per_token: int = 0, prefix_cache: bool = False) -> None:
        self._engine = engine
        self._wait_s = wait_s
        self._cache_budget = cache_budget_bytes
        self._kv_bytes = kv_bytes_per_token
        self._logits_bytes = logits_bytes_per_token  # a prompt's logits, held until its first token
        self._reserved = 0  # bytes of the caches of the single runs, the groups and the kept generators
        # rewind_to: onnxruntime-genai 0.6+
        self._prefix = PrefixCache() if prefix_cache and hasattr(og.Generator, "rewind_to") else None
        self._reserved_said = 0
        self._waiting: list[Run] = []  # single runs waiting for their cache to fit, in order
        self._last_arrival = float("-inf")
        self._single: dict[int, Run] = {}
        self._groups = Groups()  # batched generators of runs that started together
        self._batch = EngineRuns(engine.og_engine)  # runs on the og.Engine
        self._gathering: list[Run] = []  # static batching: waiting for the group to start
        self._gather_since = 0.0
        # A static group starts once this many gathered (or the window passed): a batched
        # generator takes more than og.Engine's fixed group.
        self._full = GROUP_MAX if engine.can_group else engine.batching.group_size

    @property
    def active(self) -> int:
        return (len(self._single) + len(self._batch) + len(self._gathering) + len(self._waiting)
                + len(self._groups.live()))

    def wait_time(self) -> float | None:
        """How long the loop may block waiting for messages: None = until one comes."""
        if self._single or self._batch or self._waiting or self._groups:
            return 0.0
        if self._gathering:
            if len(self._gathering) >= self._full or self._lone_gathering():
                return 0.0  # a full group, or a lone request, starts now
            return max(0.0, self._gather_since + self._wait_s - time.monotonic())
        return None

    # --- in -------------------------------------------------------------------------------
    def submit(self, rid: int, work: Work) -> list[Event]:
        received = time.monotonic()
        try:
            prompt = self._engine.prepare(work)
            run = Run(rid, work, prompt, self._engine.token_stream(), "single", received)
            mode = self._engine.batching.mode
        except AgentError as exc:
            return [("failed", rid, exc)]
        previous, self._last_arrival = self._last_arrival, received
        if not self._engine.fits_batch(work, prompt) or self._prefix_hit(run) >= PREFIX_OVER_BATCH:
            return self._start(run, single=True)
        if mode == "dynamic":
            return self._start(run, single=not self.active)
        if self._batch:
            return self._start(run, single=False)  # waits for the running group (the engine queues it)
        # Nothing running and none came lately: no company is coming, unless it came in the same
        # read of the inbox (a burst); the step after that read starts a lone one at once.
        run.lone = not self.active and received - previous > self._wait_s
        if not self._gathering:
            self._gather_since = received
        self._gathering.append(run)
        return []

    def cancel(self, rid: int) -> list[Event]:
        """End a request now with the text it has; an unknown id is no error (it finished)."""
        run = self._single.pop(rid, None)
        if run is not None:
            self._release(run)
            return [("done", rid, run.result(FINISH_CANCELLED))]
        run, freed = self._groups.cancel(rid)
        if run is not None:
            self._reserved -= freed
            return [("done", rid, run.result(FINISH_CANCELLED))]
        run = next((r for r in (*self._gathering, *self._waiting) if r.rid == rid), None)
        if run is not None:
            (self._gathering if run in self._gathering else self._waiting).remove(run)
            return [("done", rid, run.result(FINISH_CANCELLED))]
        run = self._batch.cancel(rid)
        if run is not None:
            return [("done", rid, run.result(FINISH_CANCELLED))]
        log.info("inference.cancel_unknown", rid=rid)
        return []

    # --- a turn of the loop -------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        now = time.monotonic()
        events.extend(self._expire(now))
        group_full = len(self._gathering) >= self._full
        if self._gathering and (group_full or self._lone_gathering() or now - self._gather_since >= self._wait_s):
            events.extend(self._start_group())
        events.extend(self._admit_waiting())
        for run in list(self._single.values()):
            events.extend(self._step_single(run))
        group_events, freed = self._groups.step(self._engine.eos_ids)
        events.extend(group_events)
        self._reserved -= freed
        events.extend(self._batch.step(self._engine.eos_ids))
        if self._reserved != self._reserved_said:
            self._reserved_said = self._reserved
            events.append(("memory", 0, self._reserved))
        return events

    def _lone_gathering(self) -> bool:
        return len(self._gathering) == 1 and self._gathering[0].lone and not self._busy()

    def _busy(self) -> bool:
        return bool(self._single or self._batch or self._groups)

    def run_one(self, work: Work) -> Generation:
        """Generate one request to the end (warm-up, tools, tests): raises what it fails with."""
        events = self.submit(0, work)
        while not events:
            events = [e for e in self.step() if e[0] in ("done", "failed")]
        kind, _, value = events[0]
        if kind == "failed":
            raise value
        return value  # type: ignore[no-any-return]

    def _start_group(self) -> list[Event]:
        """The gathered runs: batched generators for those that can share one, og.Engine for the
        rest; one alone after all gets its own generator (fastest). A lone run that started on
        its own a moment ago (the first of a burst) joins the group: two generators stepping
        side by side cost nearly twice one batched step."""
        rest, self._gathering = self._gathering, []
        events: list[Event] = []
        young = [run for run in self._single.values() if run.lone and len(run.tokens) <= ADOPT_TOKENS]
        if self._engine.can_group and len(rest) + len(young) >= 2:
            free = None
            if self._cache_budget is not None:  # runs waiting for memory keep their turn
                free = 0 if self._waiting else self._cache_budget - self._reserved
            groups, rest = split([*young, *rest], kv_bytes=self._kv_bytes, free_bytes=free,
                                 context=self._engine.context_length, logits_bytes=self._logits_bytes)
            for members in groups:
                for run in members:
                    if self._single.pop(run.rid, None) is not None:
                        self._release(run)  # its generator goes: the group prefills its tokens so far
                opened, held = self._groups.open(self._engine, members, self._kv_bytes, self._logits_bytes)
                self._reserved += held
                events.extend(opened)
                log.debug("inference.group_started", rids=[run.rid for run in members], reserved=self._reserved)
            rest = [run for run in rest if run.rid not in self._single]  # a young one left out goes on
        alone = len(rest) == 1 and not self._busy()
        return events + [event for run in rest for event in self._start(run, single=alone)]

    def _start(self, run: Run, *, single: bool) -> list[Event]:
        return self._guarded(run, self._start_single if single else self._start_batch)

    @staticmethod
    def _guarded(run: Run, start: Any) -> list[Event]:
        """Start generating; a failure to start is that request's alone."""
        try:
            start(run)
        except AgentError as exc:
            return [("failed", run.rid, exc)]
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which answers `internal`
            return [("failed", run.rid, f"{type(exc).__name__}: {exc}")]
        return []

    def fail_all(self, text: str) -> list[Event]:
        """The runtime raised where no request could be blamed: every request in flight fails."""
        runs = [*self._single.values(), *self._batch.live(), *self._gathering, *self._waiting,
                *self._groups.live()]
        self._single.clear()
        self._batch.clear()
        self._gathering.clear()
        self._waiting.clear()
        self._groups.clear()
        self._reserved = 0
        if self._prefix is not None:
            self._prefix.clear()
        return [("failed", run.rid, text) for run in runs]

    def _start_single(self, run: Run) -> None:
        run.path = "single"
        if self._cache_budget is not None:
            need = self._cache_bytes(run)
            if need > self._cache_budget:
                tokens = run.prompt.length + run.prompt.budget
                raise TooLarge(f"the request needs a cache of {tokens} tokens and its prompt's logits "
                               f"({need / 2**20:.1f} MB); the memory "
                               f"budget leaves {self._cache_budget / 2**20:.1f} MB for caches (inference.memory_mb)")
            if self._waiting or not self._room(run):
                self._waiting.append(run)  # in order: none passes the one ahead
                return
        self._open(run)

    def _open(self, run: Run) -> None:
        """Its generator (a kept one continued, or a new one), with its cache counted as held."""
        hit, dropped = self._prefix.take(run.prompt.ids, run.max_length) if self._prefix_usable(run) else (None, 0)
        self._reserved -= dropped
        if hit is not None:  # its cache is counted already
            run.generator, run.cached, run.max_length, run.reserved = hit.generator, hit.cached, hit.max_length, hit.bytes
        else:
            if self._prefix_usable(run):  # sized to be continued by a slightly longer prompt too
                spare = None if self._cache_budget is None else self._cache_budget - self._reserved
                run.max_length = reusable_length(run.max_length, self._engine.context_length, self._kv_bytes, spare)
            run.reserved = run.max_length * self._kv_bytes
            self._reserved += run.reserved
            try:
                run.generator = self._engine.generator(run.prompt, run.work.params, run.max_length)
            except BaseException:
                self._reserved -= run.reserved
                raise
        run.logits = (run.prompt.length - run.cached) * self._logits_bytes  # only what it appends
        self._reserved += run.logits
        self._single[run.rid] = run
        log.debug("inference.started", rid=run.rid, running=len(self._single), reserved=self._reserved,
                  cached=run.cached)

    def _cache_bytes(self, run: Run) -> int:
        """What it needs to start (it has not yet): its cache, and its prompt's logits (held until
        its first token)."""
        return (run.prompt.length + run.prompt.budget) * self._kv_bytes + run.prompt.length * self._logits_bytes

    def _release(self, run: Run, *, keep: bool = False) -> None:
        """`keep`: it ended well; its cache stays held, for a later prompt to continue."""
        self._reserved -= run.logits
        run.logits = 0
        if keep and self._prefix_usable(run):
            self._reserved -= self._prefix.keep(run.generator, run.max_length, run.reserved)
        else:
            self._reserved = max(0, self._reserved - run.reserved)
        run.generator = None

    def _admit_waiting(self) -> list[Event]:
        """Start the waiting runs, in order, while the one ahead fits (only with a budget)."""
        events: list[Event] = []
        while self._waiting and self._room(self._waiting[0]):
            events.extend(self._guarded(self._waiting.pop(0), self._open))
        return events

    # --- prefix reuse (prefix.py) -------------------------------------------------------------
    def _prefix_usable(self, run: Run) -> bool:
        return self._prefix is not None and reusable(run.work.params, run.prompt.ids)

    def _prefix_hit(self, run: Run) -> int:
        """The prompt tokens a kept cache would give it (0: none)."""
        found = self._prefix.best(run.prompt.ids, run.max_length) if self._prefix_usable(run) else None
        return found[1] if found else 0

    def _room(self, run: Run) -> bool:
        """Whether its cache fits the budget now: a prefix hit takes no more; else kept caches
        give way, least recently used first (they never make a request wait)."""
        if self._cache_budget is None or self._prefix_hit(run):
            return True
        need = self._cache_bytes(run)
        while self._reserved + need > self._cache_budget and self._prefix is not None and len(self._prefix):
            self._reserved -= self._prefix.evict()
        return self._reserved + need <= self._cache_budget

    def _start_batch(self, run: Run) -> None:
        run.path = "batch"
        self._batch.start(run, *self._engine.batch_turn(run.prompt, run.work.params))

    def _step_single(self, run: Run) -> list[Event]:
        generator = run.generator
        if generator.is_done():
            return self._end_single(run, run.finish or FINISH_LENGTH)
        generator.generate_next_token()
        self._reserved -= run.logits  # the prompt was read: its logits are gone
        run.logits = 0
        piece = run.take(int(generator.get_next_tokens()[0]), self._engine.eos_ids)
        events: list[Event] = [("token", run.rid, piece)] if piece is not None and run.work.stream else []
        if piece is None or len(run.pieces) >= run.prompt.budget:
            events.extend(self._end_single(run, run.finish or FINISH_LENGTH))
        return events

    def _end_single(self, run: Run, finish: str) -> list[Event]:
        del self._single[run.rid]
        self._release(run, keep=True)
        return [("done", run.rid, run.result(finish))]

    def _expire(self, now: float) -> list[Event]:
        events: list[Event] = []
        for run in [r for r in self._gathering if r.expired(now)]:
            self._gathering.remove(run)
            events.append(("failed", run.rid, Timeout("deadline passed before generation started")))
        for run in [r for r in self._waiting if r.expired(now)]:
            self._waiting.remove(run)
            events.append(("failed", run.rid, Timeout("deadline passed while waiting for memory for its cache")))
        for run in [r for r in self._single.values() if r.expired(now)]:
            del self._single[run.rid]
            self._release(run)
            events.append(("failed", run.rid, Timeout(f"deadline passed after {len(run.pieces)} generated tokens")))
        expired, freed = self._groups.expire(now)
        self._reserved -= freed
        events.extend(("failed", run.rid, Timeout(f"deadline passed after {len(run.pieces)} generated tokens"))
                      for run in expired)
        for run in self._batch.expire(now):
            events.append(("failed", run.rid, Timeout(f"deadline passed after {len(run.pieces)} generated tokens")))
        return events
