"""Prompt-prefix reuse (issue 18 point 3) with real ORT GenAI: a greedy request continued from a
kept cache answers exactly as from scratch and says how many prompt tokens it took from the
cache; sampled and guided requests never reuse; kept caches give way to a request that needs
the room; and the answer over a real mosquitto carries usage.cached_tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edge_agent.inference.child.core import Core
from edge_agent.inference.child.engine import OrtGenaiEngine
from edge_agent.inference.child.prefix import (MIN_APPEND, MIN_COMMON, PREFIX_OVER_BATCH, PrefixCache,
                                               reusable_length)
from edge_agent.inference.types import GenerationParams, Generation, Guidance, Work
from support import AgentProcess, Broker, Client, ask, free_port
from test_metrics import scrape, value

SYSTEM = "You answer questions about plants, weather and cities briefly and politely. " * 8
QUESTIONS = ["What is the capital of France?", "Name three flowers.", "Why is the sky blue?",
             "Tell me about the garden."]
TOKENS = 24


def work(question: str, system: str = SYSTEM, **params: Any) -> Work:
    return Work(({"role": "system", "content": system}, {"role": "user", "content": question}),
                GenerationParams(TOKENS, **params))


def load(folder: Path) -> OrtGenaiEngine:
    engine = OrtGenaiEngine(folder, "cpu", batching=False)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> OrtGenaiEngine:
    return load(tiny_model)


@pytest.fixture(scope="module")
def smollm2(smollm2_model: Path) -> OrtGenaiEngine:
    return load(smollm2_model)


def reuse_and_not(engine: OrtGenaiEngine, works: list[Work]) -> tuple[list[Generation], list[Generation]]:
    """Each work in turn on a Core that reuses prefixes and on one that does not."""
    on = Core(engine, prefix_cache=True, kv_bytes_per_token=1)
    off = Core(engine, prefix_cache=False, kv_bytes_per_token=1)
    return [on.run_one(w) for w in works], [off.run_one(w) for w in works]


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_the_same_greedy_request_twice_is_the_same_text_and_the_second_is_cached(
        model: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(model)
    question = work(QUESTIONS[0], system=SYSTEM[:200])  # the tiny model's context is 512
    (first, second), (alone, again) = reuse_and_not(engine, [question, question])
    assert first.text == second.text == alone.text == again.text, (first.text, second.text, alone.text)
    assert first.cached_tokens == 0 and alone.cached_tokens == again.cached_tokens == 0
    # all the prompt but the last MIN_APPEND tokens came from the first request's cache
    assert second.cached_tokens == second.prompt_tokens - MIN_APPEND, second
    assert second.completion_tokens == alone.completion_tokens


@pytest.mark.slow
def test_requests_sharing_a_long_system_prompt_answer_as_without_reuse(smollm2: OrtGenaiEngine) -> None:
    shared = len(smollm2.prompt_tokens(({"role": "system", "content": SYSTEM},)))
    reused, fresh = reuse_and_not(smollm2, [work(q) for q in QUESTIONS])
    for question, with_reuse, without in zip(QUESTIONS, reused, fresh):
        assert with_reuse.text == without.text, (question, with_reuse.text, without.text)
        assert with_reuse.prompt_tokens == without.prompt_tokens and without.cached_tokens == 0
    assert reused[0].cached_tokens == 0
    # the system prompt (less its end marker, which the template writes as it closes the turn)
    assert all(shared - 4 <= r.cached_tokens < r.prompt_tokens for r in reused[1:]), [r.cached_tokens for r in reused]
    assert "Paris" in reused[0].text


def test_sampled_and_guided_requests_never_reuse(tiny: OrtGenaiEngine) -> None:
    core = Core(tiny, prefix_cache=True, kv_bytes_per_token=1)
    system = SYSTEM[:200]
    core.run_one(work(QUESTIONS[0], system=system))  # kept
    sampled = core.run_one(work(QUESTIONS[0], system=system, temperature=0.8, seed=7))
    guided = core.run_one(work(QUESTIONS[0], system=system, guidance=Guidance("regex", "[a-z ]{1,20}", False)))
    assert sampled.cached_tokens == 0 and guided.cached_tokens == 0
    # a seeded sampled answer is the same as on a Core that keeps nothing
    off = Core(tiny, prefix_cache=False).run_one(work(QUESTIONS[0], system=system, temperature=0.8, seed=7))
    assert sampled.text == off.text
    # and neither was kept in place of the greedy one: the greedy request still finds its cache
    assert core.run_one(work(QUESTIONS[0], system=system)).cached_tokens > 0


def run_to_end(core: Core, rid: int, w: Work, steps: int = 500) -> tuple[Generation, list[int]]:
    """Submit and step until it is done; the memory the Core said it held at each change."""
    events, held = core.submit(rid, w), []
    for _ in range(steps):
        for kind, _, value in events:
            if kind == "memory":
                held.append(value)
            elif kind == "failed":
                raise value
            elif kind == "done":
                return value, held
        events = core.step()
    raise AssertionError(f"request {rid} not done after {steps} steps: held {held}")


@pytest.mark.slow
def test_a_long_prefix_hit_leaves_the_batch_and_every_answer_is_as_alone(smollm2_model: Path) -> None:
    engine = OrtGenaiEngine(smollm2_model, "cpu")  # batching on: static groups on CPU
    engine.load()
    assert engine.batching.mode == "static", engine.batching
    system = SYSTEM * 3  # over PREFIX_OVER_BATCH shared tokens
    core = Core(engine, prefix_cache=True, kv_bytes_per_token=1)
    core.run_one(work(QUESTIONS[0], system=system))  # alone on an idle engine: its own generator, kept
    events = [e for rid in (1, 2) for e in core.submit(rid, work(QUESTIONS[rid], system=system))]
    done: dict[int, Generation] = {}
    for _ in range(500):
        done.update({rid: value for kind, rid, value in events if kind == "done"})
        if len(done) == 2:
            break
        events = core.step()
    assert done[1].path == "single" and done[1].cached_tokens >= PREFIX_OVER_BATCH, done[1]
    assert done[2].path == "batch" and done[2].cached_tokens == 0, done[2]  # the kept one was taken
    plain = Core(engine, prefix_cache=False)
    for rid in (1, 2):
        assert done[rid].text == plain.run_one(work(QUESTIONS[rid], system=system)).text


def test_kept_caches_give_way_to_a_request_that_fits_the_budget(tiny: OrtGenaiEngine) -> None:
    kv = 1024  # the tiny model's cache per token (test_memory.py)
    first, second = work(QUESTIONS[0], system=SYSTEM[:200]), work(QUESTIONS[1], system="Be brief. " * 30)
    need = max(len(tiny.prompt_tokens(w.messages)) + TOKENS for w in (first, second)) * kv
    budget = need + 16 * kv  # room for either cache, not for both
    core = Core(tiny, cache_budget_bytes=budget, kv_bytes_per_token=kv, prefix_cache=True)
    done, held = run_to_end(core, 1, first)
    assert held and held[-1] > 0  # ended, its cache still held (kept)
    other, held = run_to_end(core, 2, second)  # shares no long prefix: the kept cache gives way
    assert other.cached_tokens == 0 and other.completion_tokens > 0
    assert max(held) <= budget, (held, budget)
    # the first one's cache is gone: asked again, it is computed again, with the same answer
    again, _ = run_to_end(core, 3, first)
    assert again.cached_tokens == 0 and again.text == done.text


def test_the_cache_keeps_a_few_picks_the_longest_prefix_and_leaves_room_to_append() -> None:
    """Pure logic of prefix.py on stand-in generators (the runtime's are above)."""
    class Generator:
        def __init__(self, tokens: list[int]) -> None:
            self.tokens, self.calls = tokens, []

        def get_sequence(self, index: int) -> Any:
            return np.asarray(self.tokens + [999], dtype=np.int32)  # the last token has no cache

        def rewind_to(self, n: int) -> None:
            self.calls.append(("rewind_to", n))

        def append_tokens(self, ids: Any) -> None:
            self.calls.append(("append", list(ids)))

    cache = PrefixCache(max_kept=2)
    base = list(range(100, 140))
    short, long = Generator(base[:20]), Generator(base[:30])
    assert cache.keep(short, 64, 10) == 0 and cache.keep(long, 64, 20) == 0
    ids = np.asarray(base[:35], dtype=np.int32)
    assert cache.best(ids, 65) is None  # neither is large enough
    hit, dropped = cache.take(ids, 64)
    assert hit is not None and hit.generator is long and hit.cached == 30 and hit.bytes == 20 and dropped == 0
    assert long.calls == [("rewind_to", 30), ("append", base[30:35])]
    # the whole prompt is kept: still at least MIN_APPEND tokens are appended
    same = np.asarray(base[:20], dtype=np.int32)
    assert cache.take(same, 20)[0].cached == 20 - MIN_APPEND  # type: ignore[union-attr]
    assert cache.best(np.asarray(base[: MIN_COMMON - 1] + [1, 2, 3], dtype=np.int32), 1) is None  # too short a prefix
    for n in range(3):  # over the cap: the least recently kept goes, its bytes given back
        freed = cache.keep(Generator(base), 64, 5 + n)
    assert freed == 5 and len(cache) == 2 and cache.held_bytes == 6 + 7

    class Refusing(Generator):
        def rewind_to(self, n: int) -> None:
            raise RuntimeError("rewind not supported")

    refusing = PrefixCache()
    refusing.keep(Refusing(base), 64, 9)
    # the runtime refused: no hit, the cache is dropped and its bytes given back
    assert refusing.take(np.asarray(base[:35], dtype=np.int32), 40) == (None, 9) and len(refusing) == 0
    assert reusable_length(90, None) == 128 and reusable_length(100, 4096) == 192
    assert reusable_length(500, 512) == 512  # within the context
    assert reusable_length(100, 4096, 10, spare=3840) == 192 and reusable_length(100, 4096, 10, spare=3830) == 100


def test_the_answer_over_mqtt_says_cached_tokens(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    request = {"system": SYSTEM[:200], "prompt": QUESTIONS[0], "max_tokens": TOKENS}
    answers: dict[str, list[dict[str, Any]]] = {}
    port = free_port()
    for device, reuse in (("reuse", True), ("noreuse", False)):
        agent = start_agent(broker, client, device_id=device, inference__prefix_cache=reuse,
                            metrics__listen=f"127.0.0.1:{port}" if reuse else "")
        client.subscribe(agent.response_topic)
        answers[device] = [ask(client, agent, dict(request)) for _ in range(2)]  # each its own id
        if reuse:  # counted for Prometheus too
            cached = value(scrape(port), "edge_agent_cached_prompt_tokens_total")
            assert cached == answers[device][1]["usage"]["cached_tokens"] > 0, cached
    (first, second), (plain, plain_again) = answers["reuse"], answers["noreuse"]
    assert all(doc["ok"] for doc in (first, second, plain, plain_again)), answers
    assert first["text"] == second["text"] == plain["text"] == plain_again["text"]
    assert first["usage"]["cached_tokens"] == 0
    assert second["usage"]["cached_tokens"] == second["usage"]["prompt_tokens"] - MIN_APPEND, second["usage"]
    assert plain["usage"]["cached_tokens"] == plain_again["usage"]["cached_tokens"] == 0
