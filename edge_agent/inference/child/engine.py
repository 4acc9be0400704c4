"""Load a model folder with ONNX Runtime GenAI: its chat template, prompts, generators, and the
runtime's batching engine where it has one. Runs only in the inference child (worker.py).
The scheduler (core.py) knows it only as its `Model` interface; `generate` runs one request
through a Core of its own."""

from __future__ import annotations

import json
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnxruntime_genai as og

from edge_agent.errors import BadRequest, ModelLoadError, TooLarge, Unsupported
from edge_agent.inference.child.core import Core
from edge_agent.inference.child.run import Batching, Prompt
from edge_agent.inference.child.providers import Attempt, choose_and_load, configured_providers
from edge_agent.inference.types import (DEFAULT_BATCH_MAX_LENGTH, WARMUP_TOKENS, Generation,
                                        GenerationParams, Work, read_genai_config, takes_images)
from edge_agent.log import get_logger

log = get_logger("inference")
# Any fixed seed for greedy decoding: without one the runtime seeds its sampler from
# std::random_device, ~14 ms of CPU per generator on these machines (FACTS.md).
GREEDY_SEED = 0


class OrtGenaiEngine:
    """One loaded model. Not thread-safe: the child's main loop owns it."""

    def __init__(self, folder: Path, provider: str = "auto", fallback: Sequence[str] = ("cpu",),
                 provider_options: Mapping[str, object] | None = None, *, batching: bool = True,
                 batch_max_length: int = DEFAULT_BATCH_MAX_LENGTH) -> None:
        self.folder = folder
        self.requested_provider = provider
        self.fallback = tuple(fallback)
        self.provider_options = dict(provider_options or {})
        genai_config = read_genai_config(folder)
        model_section = genai_config.get("model", {})
        self.context_length = int(model_section.get("context_length", 0)) or None
        eos = model_section.get("eos_token_id", [])
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.name = folder.name
        self.supports_images = takes_images(genai_config)
        pad = model_section.get("pad_token_id")
        self._pad_id = pad[0] if isinstance(pad, list) and pad else pad
        self._want_batching = batching
        # The runtime's default; models made by its builder share the buffer.
        self._shares_kv_buffer = bool(genai_config.get("search", {}).get("past_present_share_buffer", True))
        self._batch_max_length = min(batch_max_length, self.context_length or batch_max_length)
        self._processor: Any = None
        self.provider, self.provider_reason = "", ""
        self.provider_attempts: tuple[Attempt, ...] = ()
        self.batching = Batching("off", 1, 0, "not loaded")
        self.og_engine: Any = None  # og.Engine when batching is on
        self._model: Any = None
        self._tokenizer: Any = None
        self._folder_providers = configured_providers(genai_config)

    def load(self) -> None:
        started = time.monotonic()
        overlay = None
        if self._batchable_runtime() and not self.supports_images and self._shares_kv_buffer:
            overlay = json.dumps({"search": {"max_length": self._batch_max_length}})
        choice = choose_and_load(self.folder, self.requested_provider, self.fallback,
                                 self._folder_providers, self.provider_options, overlay=overlay)
        self._model, self.provider, self.provider_reason = choice.model, choice.provider, choice.reason
        self.provider_attempts = choice.attempts
        try:
            self._tokenizer = og.Tokenizer(self._model)
            if self.supports_images:
                self._processor = self._model.create_multimodal_processor()
        except Exception as exc:  # ORT GenAI raises plain RuntimeError
            hint = ""
            if "Unsupported tokenizer class" in str(exc):
                # transformers 5 saves generic names (TokenizersBackend, ...) that older ORT GenAI
                # (e.g. 0.11, the newest for Python 3.10) does not know.
                hint = (f" (onnxruntime-genai {og.__version__} does not know the tokenizer_class in "
                        "tokenizer_config.json: set it to the model's own class, e.g. GPT2Tokenizer "
                        "or LlamaTokenizer, or use a newer onnxruntime-genai)")
            raise ModelLoadError(f"cannot load the tokenizer/processor of {self.folder}: {exc}{hint}") from exc
        self.batching = self._start_batching()
        if self.batching.mode == "static":
            self._warm_batch_group()
        log.info("model.loaded", model=self.name, provider=self.provider, reason=self.provider_reason,
                 context_length=self.context_length, batching=self.batching.mode,
                 batching_reason=self.batching.reason, ms=round((time.monotonic() - started) * 1000, 1))

    @property
    def can_group(self) -> bool:
        """Batched generators for requests that start together (group.py): text models with a
        pad token to pad their prompts with."""
        return self._pad_id is not None and not self.supports_images

    def _warm_batch_group(self) -> None:
        """Run one full group of one-token turns: the static engine's cache (the runtime sizes it
        to the largest group it has run) is all there from the load on, as the memory plan counts
        it, not taken later by the first newcomer that joins a running group."""
        ids = np.asarray(self._tokenizer.encode("Hello"), dtype=np.int32)
        requests = []
        try:
            for _ in range(self.batching.group_size):
                requests.append(self.og_engine.create_request())
                options = og.TurnOptions(requests[-1])
                options.set_max_generated_tokens(1)
                options.set_do_sample(False)
                requests[-1].begin_turn(ids, options)
            buffer = self.og_engine.create_event_buffer(8 * self.batching.group_size)
            while self.og_engine.has_pending_requests():
                self.og_engine.run(buffer)
        finally:
            for request in requests:
                request.close()

    def _batchable_runtime(self) -> bool:
        return self._want_batching and hasattr(og, "TurnOptions")

    def _start_batching(self) -> Batching:
        """og.Engine (0.16+ event API) where the runtime and model have it; else why not."""
        if not self._want_batching:
            return Batching("off", 1, 0, "inference.batching = false")
        if not hasattr(og, "TurnOptions"):
            return Batching("off", 1, 0, f"onnxruntime-genai {og.__version__} has no batching engine "
                            "with guidance and cancel (0.16+): one generator per request")
        if self.supports_images:
            return Batching("off", 1, 0, "the batching engine has no multimodal path: one generator per request")
        if not self._shares_kv_buffer:
            # Measured on such a model: prompts of different lengths in one group got other
            # answers than alone, or failed in the runtime ("present.0.key ... has shape").
            return Batching("off", 1, 0, "the model keeps past and present KV apart "
                            "(search.past_present_share_buffer = false): og.Engine batches it wrongly")
        try:
            self.og_engine = og.Engine(self._model)
            caps = self.og_engine.get_capabilities()
        except Exception as exc:  # noqa: BLE001 - a model the engine refuses still generates alone
            return Batching("off", 1, 0, f"og.Engine refused the model: {str(exc)[:160]}")
        group = int(caps.configured_max_batch_size) or 1
        if self._takes_turn_seed():
            return Batching("dynamic", group, self._batch_max_length,
                            f"og.Engine, continuous batching up to {group} (paged attention)")
        return Batching("static", group, self._batch_max_length,
                        f"og.Engine, groups of {group}; newcomers wait for the running group")

    def _takes_turn_seed(self) -> bool:
        """Whether og.Engine batches dynamically. Its one observable sign (0.18): only then does
        a turn take a seed of its own ("A per-turn seed requires an Engine configured for
        dynamic batching"). Probed with a one-token turn, cancelled."""
        request = self.og_engine.create_request()
        try:
            options = og.TurnOptions(request)
            options.set_max_generated_tokens(1)
            options.set_seed(0)
            turn = request.begin_turn(np.zeros(1, dtype=np.int32), options)
        except Exception:  # noqa: BLE001 - a static engine refuses it: that is the answer
            request.close()
            return False
        request.cancel_turn(turn)
        buffer = self.og_engine.create_event_buffer(8)
        while self.og_engine.has_pending_requests():
            self.og_engine.run(buffer)
        request.close()
        return True

    def warm_up(self) -> Generation:
        return self.generate(({"role": "user", "content": "Hello"},), GenerationParams(WARMUP_TOKENS))

    def generate(self, messages: Sequence[dict[str, str]], params: GenerationParams,
                 deadline: float | None = None, images: Sequence[bytes] = ()) -> Generation:
        """One request on its own, start to end (tools and tests; the child's loop has one Core)."""
        return Core(self).run_one(Work(tuple(messages), params, deadline, tuple(images)))

    # --- prompts -----------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            return str(self._tokenizer.apply_chat_template(json.dumps(list(messages)),
                                                           add_generation_prompt=True))
        except Exception as exc:
            raise ModelLoadError(f"the model's chat template failed: {exc}") from exc

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> Any:
        return self._tokenizer.encode(self.chat_prompt(messages))

    def prepare(self, work: Work) -> Prompt:
        """Tokens (or processor inputs) and the token budget; TooLarge beyond the context."""
        if work.images:
            if self._processor is None:
                raise Unsupported(f"model {self.name} takes no images")
            inputs, ids = self._image_inputs(work.messages, work.images), None
            length = int(inputs["input_ids"].shape()[-1])
        else:
            inputs, ids = None, np.asarray(self.prompt_tokens(work.messages), dtype=np.int32)
            length = len(ids)
        budget = work.params.max_new_tokens
        if self.context_length:
            if length >= self.context_length:
                raise TooLarge(f"prompt is {length} tokens; the model's context is {self.context_length}")
            budget = min(budget, self.context_length - length)
        return Prompt(ids, inputs, length, budget)

    def _image_inputs(self, messages: Sequence[dict[str, str]], images: Sequence[bytes]) -> Any:
        """Processor inputs: `<|image_N|>` tags lead the last user message, one per image.
        Every image must already be a JPEG or PNG made by us (images.py): ORT GenAI's decoder
        ends the whole process on anything else."""
        tags = "".join(f"<|image_{n}|>\n" for n in range(1, len(images) + 1))
        tagged = [*messages[:-1], {**messages[-1], "content": tags + messages[-1]["content"]}]
        return self._processor(self.chat_prompt(tagged), images=og.Images.open_bytes(*images))

    def token_stream(self) -> Any:
        return self._tokenizer.create_stream()

    # --- generators ----------------------------------------------------------------------
    def generator(self, prompt: Prompt, params: GenerationParams, max_length: int) -> Any:
        """A generator of its own for one request, prompt already appended. `max_length` sizes
        its KV buffer (the Run's: what this request can use, or more for reuse)."""
        search = og.GeneratorParams(self._model)
        options = params.search_options()
        options.setdefault("random_seed", GREEDY_SEED if not params.sampling else secrets.randbits(31))
        search.set_search_options(max_length=max_length, **options)
        if params.guidance is not None:
            set_guidance(search, params.guidance)
        with grammar_errors():  # the grammar is compiled here, not in set_guidance
            generator = og.Generator(self._model, search)
        if prompt.inputs is not None:
            generator.set_inputs(prompt.inputs)
        else:
            generator.append_tokens(prompt.ids)
        return generator

    def group_generator(self, rows: Sequence[tuple[Prompt, Sequence[int]]], params: GenerationParams) -> Any:
        """One batched generator for requests that share these options. Row i is rows[i]: a
        prompt and the tokens it generated so far (none for a new one), padded on the right with
        the pad token (as the runtime's encode_batch pads)."""
        tokens = [np.concatenate([prompt.ids, np.asarray(done, dtype=np.int32)]) for prompt, done in rows]
        longest = max(len(row) for row in tokens)
        most = max(prompt.budget - len(done) for prompt, done in rows)
        search = og.GeneratorParams(self._model)
        options = params.search_options()
        options.setdefault("random_seed", GREEDY_SEED if not params.sampling else secrets.randbits(31))
        search.set_search_options(max_length=longest + most, batch_size=len(rows), **options)
        ids = np.full((len(rows), longest), self._pad_id, dtype=np.int32)
        for row, row_tokens in zip(ids, tokens):
            row[:len(row_tokens)] = row_tokens
        generator = og.Generator(self._model, search)
        generator.append_tokens(ids)
        return generator

    def batch_turn(self, prompt: Prompt, params: GenerationParams) -> tuple[Any, Any]:
        """(request, turn) on the batching engine."""
        request = self.og_engine.create_request()
        try:
            options = og.TurnOptions(request)
            options.set_max_generated_tokens(prompt.budget)
            options.set_do_sample(params.sampling)
            if params.temperature:
                options.set_temperature(float(params.temperature))
            if params.top_p is not None:
                options.set_top_p(float(params.top_p))
            if params.top_k is not None:
                options.set_top_k(int(params.top_k))
            if params.guidance is not None:
                set_guidance(options, params.guidance)
            with grammar_errors():
                return request, request.begin_turn(prompt.ids, options)
        except BaseException:
            request.close()
            raise

    def fits_batch(self, work: Work, prompt: Prompt) -> bool:
        """Whether the batching engine can run this request exactly as asked."""
        if self.og_engine is None or work.images:
            return False
        if work.params.seed is not None and self.batching.mode != "dynamic":
            return False  # "A per-turn seed requires an Engine configured for dynamic batching"
        return prompt.length + prompt.budget <= self.batching.max_length


def set_guidance(target: Any, guidance: Any) -> None:
    """`target` is GeneratorParams or TurnOptions."""
    if not hasattr(target, "set_guidance"):
        raise Unsupported(f"onnxruntime-genai {og.__version__} has no guided decoding (response_format)")
    with grammar_errors(always=True):
        target.set_guidance(guidance.kind, guidance.data)


@contextmanager
def grammar_errors(*, always: bool = False) -> Iterator[None]:
    """A schema, pattern or grammar the runtime refuses is the request's fault: bad_request
    with the runtime's words. `always`: every error here is one (set_guidance)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - ORT GenAI raises plain RuntimeError
        text = " ".join(str(exc).split())
        if always or "grammar" in text.lower():
            raise BadRequest(f"response_format refused: {text[:300]}") from exc
        raise
