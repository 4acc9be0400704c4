"""Requests that start together share one batched generator (inference/child/group.py): with
real ORT GenAI on SmolLM2, each gets its text alone; a cancel or a deadline ends one member
and the others go on; a memory budget that holds part of the group splits it. And the split
itself, as pure logic."""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pytest

from edge_agent.errors import Timeout
from edge_agent.inference.child.core import Core
from edge_agent.inference.child.run import Prompt, Run
from edge_agent.inference.child.engine import OrtGenaiEngine
from edge_agent.inference.child.group import GROUP_MAX, split
from edge_agent.inference.types import FINISH_CANCELLED, Generation, GenerationParams, Guidance, Work

QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "Is the door open?",
             "Say hello to the new neighbours, please."]
STORY = "Write a long story about a lighthouse keeper and his cat."


def work(prompt: str, tokens: int, **params: Any) -> Work:
    return Work(({"role": "user", "content": prompt},), GenerationParams(tokens, **params))


@pytest.fixture(scope="module")
def engine(smollm2_model: Path) -> OrtGenaiEngine:
    loaded = OrtGenaiEngine(smollm2_model, "cpu")
    loaded.load()
    if loaded.batching.mode == "off":  # the Core gathers groups only where the runtime batches (0.16+)
        pytest.skip(f"no batching here: {loaded.batching.reason}")
    assert loaded.batching.mode == "static" and loaded.can_group
    return loaded


@dataclass(frozen=True)
class Agreed:
    """Greedy decoding of a prompt in the raw runtime, alone and batched."""
    answer: str  # the answer alone
    text: str  # the answer alone up to the first token where a batched generator parts from it
    whole: bool  # the batched generator gave the whole answer alone


def raw_greedy(engine: OrtGenaiEngine, ids: np.ndarray, tokens: int, rows: int) -> list[int]:
    """Row 0's greedy tokens on a generator of `rows` identical rows (no padding, no agent code)."""
    params = og.GeneratorParams(engine._model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False, batch_size=rows)
    generator = og.Generator(engine._model, params)
    generator.append_tokens(np.tile(ids, (rows, 1)))
    out: list[int] = []
    while not generator.is_done() and len(out) < tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return [token for token in out if token not in engine.eos_ids]


def runtime_agreement(engine: OrtGenaiEngine, prompt: str, tokens: int, *, prefilled: int = 0) -> Agreed:
    """How far the raw runtime's greedy answer to `prompt` on a batched generator (two identical
    rows) is its answer alone. Batched kernels need not add up in the order single ones do: on
    this 2-core CPU without AVX2 the two parted after 21 tokens of STORY, where on others they
    agree for every token; a group member can be held to its answer alone only that far.
    `prefilled`: the answer's first tokens go in with the prompt, at once (a group prefills again
    those a run it adopts made alone; that too may add up otherwise than one step at a time)."""
    ids = np.asarray(engine.prepare(work(prompt, tokens)).ids, dtype=np.int32)
    head = raw_greedy(engine, ids, prefilled, 1) if prefilled else []
    ids = np.concatenate([ids, np.asarray(head, dtype=np.int32)])
    alone, batched = raw_greedy(engine, ids, tokens - prefilled, 1), raw_greedy(engine, ids, tokens - prefilled, 2)
    same = next((n for n, (a, b) in enumerate(zip(alone, batched)) if a != b), min(len(alone), len(batched)))

    def text(answer: list[int]) -> str:
        return str(engine._tokenizer.decode(np.asarray(head + answer, dtype=np.int32)))
    return Agreed(text(alone), text(alone[:same]), alone == batched)


def assert_as_alone(got: Generation, agreed: Agreed) -> None:
    """A member's answer is its answer alone, as far as the runtime's batched kernels allow:
    wrong padding, positions or masks would part from the first token."""
    if agreed.whole:
        assert got.text == agreed.answer, (got, agreed)
    else:
        assert agreed.text and got.text.startswith(agreed.text), (agreed, got.text)


def run_all(core: Core, works: dict[int, Work | None], *, cancel: dict[int, int] | None = None,
            budget: int | None = None) -> dict[Any, Generation | Any]:
    """Submit all in one read of the inbox (None: submitted before), step to the end; `cancel`:
    rid -> after how many of its tokens. Checks at every step that the caches held stay within
    `budget`. Also "tokens": rid -> the text streamed."""
    events = [e for rid, w in works.items() if w is not None for e in core.submit(rid, w)]
    ended: dict[int, Any] = {rid: value for kind, rid, value in events if kind in ("done", "failed")}
    tokens: dict[int, int] = {}
    texts: dict[int, list[str]] = {rid: [] for rid in works}
    deadline = time.monotonic() + 120
    while len(ended) < len(works) and time.monotonic() < deadline:
        for kind, rid, value in core.step():
            if kind == "token":
                tokens[rid] = tokens.get(rid, 0) + 1
                texts[rid].append(value)
                if cancel and tokens[rid] == cancel.get(rid):
                    ended.update({r: v for _, r, v in core.cancel(rid)})
            elif kind in ("done", "failed"):
                ended[rid] = value
            elif kind == "memory" and budget is not None:
                assert value <= budget, (value, budget)
        if budget is not None:
            assert core._reserved <= budget
    assert len(ended) == len(works), ended
    return {**ended, "tokens": texts}


def test_eight_started_together_run_as_one_group_and_answer_as_alone(engine: OrtGenaiEngine) -> None:
    alone = [engine.generate(({"role": "user", "content": q},), GenerationParams(40)) for q in QUESTIONS]
    assert "Paris" in alone[0].text and alone[0].path == "single"
    core = Core(engine)
    # one asks for 3 tokens only: it stops on its own budget while the others go on
    got = run_all(core, {n: work(QUESTIONS[n % 4], 3 if n == 5 else 40) for n in range(8)})
    agreed = [runtime_agreement(engine, q, 40) for q in QUESTIONS]
    assert [a.answer for a in agreed] == [a.text for a in alone]  # the agent's path alone is the runtime's
    for n in range(8):
        assert got[n].path == "group", got[n]
        expected = alone[n % 4]
        if n == 5:
            assert got[n].completion_tokens == 3 and got[n].finish_reason == "length"
            assert expected.text.startswith(got[n].text) and got[n].text
        else:
            assert_as_alone(got[n], agreed[n % 4])
            assert (got[n].finish_reason == expected.finish_reason) or not agreed[n % 4].whole
    assert core._reserved == 0 and core.active == 0 and not core._groups


def test_the_first_of_a_burst_started_alone_joins_the_group_with_its_text_unchanged(
        engine: OrtGenaiEngine) -> None:
    core = Core(engine, wait_s=0.0)  # the group starts at the next step: the lead has made 3 tokens then
    lead = work(QUESTIONS[3], 40)
    events = core.submit(0, Work(lead.messages, lead.params, stream=True))
    while sum(1 for kind, _, _ in events if kind == "token") < 3:
        events += core.step()  # it came alone to an idle engine: it runs on its own generator
    assert core._single[0].path == "single"
    got = run_all(core, {0: None, 1: work(QUESTIONS[1], 40), 2: work(QUESTIONS[2], 40)})
    assert [got[n].path for n in range(3)] == ["group"] * 3
    adopted = runtime_agreement(engine, QUESTIONS[3], 40, prefilled=3)
    assert_as_alone(got[0], adopted)  # its prompt and 3 tokens prefilled again, then on in the group
    for n in (1, 2):
        assert_as_alone(got[n], runtime_agreement(engine, QUESTIONS[n], 40))
    before = "".join(v for kind, _, v in events if kind == "token")
    assert before and adopted.text.startswith(before)  # the 3 tokens it made alone
    streamed = before + "".join(got["tokens"][0])
    assert streamed == got[0].text  # the stream went on where it was: nothing twice, nothing lost
    assert not core._single and not core._groups and core._reserved == 0


def test_a_cancelled_member_ends_alone_and_the_others_keep_their_answers(engine: OrtGenaiEngine) -> None:
    alone = engine.generate(({"role": "user", "content": STORY},), GenerationParams(60))
    undisturbed = run_all(Core(engine), {n: work(STORY, 60) for n in range(4)})
    core = Core(engine, cache_budget_bytes=1 << 30, kv_bytes_per_token=46080)
    works = {n: work(STORY, 60) for n in range(4)}
    works[1] = Work(works[1].messages, works[1].params, stream=True)
    got = run_all(core, works, cancel={1: 5})
    assert got[1].finish_reason == FINISH_CANCELLED and got[1].path == "group"
    assert 5 <= got[1].completion_tokens < 60 and undisturbed[1].text.startswith(got[1].text)
    for n in (0, 2, 3):  # what the same group gives without the cancel, token for token
        assert got[n].text == undisturbed[n].text and got[n].completion_tokens == 60 and got[n].path == "group"
    agreed = runtime_agreement(engine, STORY, 60)
    assert agreed.answer == alone.text
    assert_as_alone(undisturbed[0], agreed)
    assert core._reserved == 0 and not core._groups  # the group and its cache went with the last member


def test_a_member_past_its_deadline_fails_and_the_others_go_on(engine: OrtGenaiEngine) -> None:
    alone = engine.generate(({"role": "user", "content": STORY},), GenerationParams(40))
    undisturbed = run_all(Core(engine), {n: work(STORY, 40) for n in range(3)})
    core = Core(engine)
    works = {n: work(STORY, 40) for n in range(3)}
    works[2] = Work(works[2].messages, works[2].params, deadline=time.monotonic() + 0.4)
    got = run_all(core, works)
    assert isinstance(got[2], Timeout) and "generated tokens" in str(got[2])
    assert got[0].text == got[1].text == undisturbed[0].text and got[0].path == "group"
    agreed = runtime_agreement(engine, STORY, 40)
    assert agreed.answer == alone.text
    assert_as_alone(undisturbed[0], agreed)


def test_a_budget_for_part_of_the_group_splits_it_and_all_are_answered(engine: OrtGenaiEngine) -> None:
    alone = [engine.generate(({"role": "user", "content": q},), GenerationParams(24)) for q in QUESTIONS]
    kv, logits = 2 * 30 * 3 * 64 * 4, 49152 * 4
    longest = max(engine.prepare(work(q, 24)).length for q in QUESTIONS)
    # three rows of the group fit (caches, and the prompts' logits while they are read), not four
    budget = 3 * ((longest + 24) * kv + longest * logits) + kv
    core = Core(engine, cache_budget_bytes=budget, kv_bytes_per_token=kv, logits_bytes_per_token=logits)
    got = run_all(core, {n: work(QUESTIONS[n % 4], 24) for n in range(8)}, budget=budget)
    paths = [got[n].path for n in range(8)]
    assert paths.count("group") == 3 and paths.count("batch") == 5, paths  # the rest on og.Engine
    agreed = [runtime_agreement(engine, q, 24) for q in QUESTIONS]
    assert [a.answer for a in agreed] == [a.text for a in alone]
    for n in range(8):
        assert_as_alone(got[n], agreed[n % 4])
    assert core._reserved == 0


def test_what_cannot_share_options_goes_to_the_batching_engine(engine: OrtGenaiEngine) -> None:
    regex = Guidance("regex", "(yes|no)", json_answer=False)
    core = Core(engine)
    works = {0: work(QUESTIONS[0], 8), 1: work(QUESTIONS[1], 8), 2: work(QUESTIONS[2], 8, guidance=regex)}
    got = run_all(core, works)
    assert [got[n].path for n in range(3)] == ["group", "group", "batch"]
    assert got[2].text in ("yes", "no")


# --- the split, pure logic ---------------------------------------------------------------------
def fake_run(rid: int, length: int, budget: int, **params: Any) -> Run:
    prompt = Prompt(None, None, length, budget)
    return Run(rid, Work(({"role": "user", "content": "x"},), GenerationParams(budget, **params)),
               prompt, None, "single", 0.0)


def test_split_keeps_options_apart_and_leaves_what_cannot_share() -> None:
    runs = [fake_run(0, 10, 5), fake_run(1, 10, 5, temperature=0.7), fake_run(2, 12, 5),
            fake_run(3, 10, 5, temperature=0.7), fake_run(4, 10, 5, seed=1), fake_run(5, 10, 5, top_k=3)]
    groups, rest = split(runs, kv_bytes=1, free_bytes=None, context=None)
    assert [[r.rid for r in g] for g in groups] == [[0, 2], [1, 3]]
    assert sorted(r.rid for r in rest) == [4, 5]  # a seed of its own; options no one else asked for


def test_split_holds_to_memory_context_and_size() -> None:
    runs = [fake_run(n, 10, 10) for n in range(5)]
    groups, rest = split(runs, kv_bytes=2, free_bytes=3 * 20 * 2, context=None)
    assert [len(g) for g in groups] == [3] and [r.rid for r in rest] == [3, 4]
    groups, rest = split([fake_run(0, 90, 5), fake_run(1, 5, 20), fake_run(2, 5, 20)],
                         kv_bytes=1, free_bytes=None, context=100)  # 90 + 20 > 100
    assert [[r.rid for r in g] for g in groups] == [[1, 2]] and [r.rid for r in rest] == [0]
    groups, rest = split([fake_run(n, 4, 4) for n in range(GROUP_MAX + 3)], kv_bytes=1, free_bytes=None,
                         context=None)
    assert [len(g) for g in groups] == [GROUP_MAX, 3] and not rest
