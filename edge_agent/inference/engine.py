"""Load a model folder with ONNX Runtime GenAI and generate text with its own chat template."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnxruntime_genai as og

from edge_agent.errors import ModelLoadError, Timeout, TooLarge, Unsupported
from edge_agent.inference.providers import Attempt, choose_and_load, configured_providers
from edge_agent.log import get_logger

log = get_logger("inference")
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def search_options(self) -> dict[str, Any]:
        """ORT GenAI search options; greedy unless the request asks for sampling."""
        sample = bool(self.temperature) or self.top_p is not None or self.top_k is not None
        options: dict[str, Any] = {"do_sample": sample}
        if self.temperature:
            options["temperature"] = float(self.temperature)
        if self.top_p is not None:
            options["top_p"] = float(self.top_p)
        if self.top_k is not None:
            options["top_k"] = int(self.top_k)
        if self.seed is not None:
            options["random_seed"] = int(self.seed)
        return options


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    generate_ms: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        if self.ttft_ms is None or self.completion_tokens < 2 or self.generate_ms <= self.ttft_ms:
            return 0.0
        return (self.completion_tokens - 1) / ((self.generate_ms - self.ttft_ms) / 1000)


def read_genai_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "genai_config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} is not a model folder: no genai_config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc


class OrtGenaiEngine:
    """One loaded model. Not thread-safe: the single inference worker owns it."""

    def __init__(self, folder: Path, provider: str = "auto", fallback: Sequence[str] = ("cpu",),
                 provider_options: Mapping[str, object] | None = None) -> None:
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
        # Phi-3(.5)-vision packages say type "phi3v"; they carry a vision session and processor.
        self.supports_images = model_section.get("type") == "phi3v" or "vision" in model_section
        self._processor: Any = None
        self.provider, self.provider_reason = "", ""
        self.provider_attempts: tuple[Attempt, ...] = ()
        self._model: Any = None
        self._tokenizer: Any = None
        self._folder_providers = configured_providers(genai_config)

    def load(self) -> None:
        started = time.monotonic()
        choice = choose_and_load(self.folder, self.requested_provider, self.fallback,
                                 self._folder_providers, self.provider_options)
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
        log.info("model.loaded", model=self.name, provider=self.provider, reason=self.provider_reason,
                 context_length=self.context_length, ms=round((time.monotonic() - started) * 1000, 1))

    def warm_up(self) -> Generation:
        return self.generate(({"role": "user", "content": "Hello"},), GenerationParams(WARMUP_TOKENS))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            return str(self._tokenizer.apply_chat_template(json.dumps(list(messages)),
                                                           add_generation_prompt=True))
        except Exception as exc:
            raise ModelLoadError(f"the model's chat template failed: {exc}") from exc

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> Any:
        return self._tokenizer.encode(self.chat_prompt(messages))

    def _image_inputs(self, messages: Sequence[dict[str, str]], images: Sequence[bytes]) -> Any:
        """Processor inputs: `<|image_N|>` tags lead the last user message, one per image.
        Every image must already be a JPEG or PNG made by us (images.py): ORT GenAI's decoder
        ends the whole process on anything else."""
        tags = "".join(f"<|image_{n}|>\n" for n in range(1, len(images) + 1))
        tagged = [*messages[:-1], {**messages[-1], "content": tags + messages[-1]["content"]}]
        return self._processor(self.chat_prompt(tagged), images=og.Images.open_bytes(*images))

    def generate(self, messages: Sequence[dict[str, str]], params: GenerationParams,
                 deadline: float | None = None, images: Sequence[bytes] = ()) -> Generation:
        """Generate an answer; raises TooLarge for a prompt beyond the context, Timeout past
        `deadline` (a time.monotonic() value)."""
        started = time.monotonic()
        if images:
            if self._processor is None:
                raise Unsupported(f"model {self.name} takes no images")
            inputs = self._image_inputs(messages, images)
            prompt_len = int(inputs["input_ids"].shape()[-1])
        else:
            tokens = self.prompt_tokens(messages)
            prompt_len = len(tokens)
        budget = params.max_new_tokens
        if self.context_length:
            if prompt_len >= self.context_length:
                raise TooLarge(f"prompt is {prompt_len} tokens; the model's context is "
                               f"{self.context_length}")
            budget = min(budget, self.context_length - prompt_len)
        search = og.GeneratorParams(self._model)
        # max_length sizes the KV buffer: keep it to what this request can use.
        search.set_search_options(max_length=prompt_len + budget, **params.search_options())
        generator = og.Generator(self._model, search)
        if images:
            generator.set_inputs(inputs)
        else:
            generator.append_tokens(tokens)
        stream = self._tokenizer.create_stream()
        pieces: list[str] = []
        produced, finish, ttft_ms = 0, "length", None
        while not generator.is_done():
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"deadline passed after {produced} generated tokens")
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if ttft_ms is None:
                ttft_ms = (time.monotonic() - started) * 1000
            if token in self.eos_ids:
                finish = "stop"
                break
            produced += 1
            pieces.append(stream.decode(token))
        del generator
        return Generation(text="".join(pieces), finish_reason=finish, prompt_tokens=prompt_len,
                          completion_tokens=produced, ttft_ms=ttft_ms,
                          generate_ms=(time.monotonic() - started) * 1000)
