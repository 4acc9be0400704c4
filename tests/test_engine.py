"""The ORT GenAI engine on the real runtime with the tiny generated model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edge_agent.errors import ModelLoadError, Timeout, TooLarge
from edge_agent.inference import GenerationParams
from edge_agent.inference.child.engine import OrtGenaiEngine

USER = ({"role": "user", "content": "Hello there"},)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> OrtGenaiEngine:
    loaded = OrtGenaiEngine(tiny_model, "cpu")
    loaded.load()
    return loaded


def test_load_reports_provider_and_context(engine: OrtGenaiEngine) -> None:
    assert engine.provider == "cpu" and engine.context_length == 512 and engine.eos_ids


def test_greedy_generation_counts_tokens(engine: OrtGenaiEngine) -> None:
    result = engine.generate(USER, GenerationParams(max_new_tokens=16))
    again = engine.generate(USER, GenerationParams(max_new_tokens=16))
    assert result.text == again.text and result.completion_tokens == 16
    assert result.finish_reason == "length" and result.prompt_tokens > 3
    assert 0 < result.ttft_ms <= result.generate_ms and result.tokens_per_s > 0


def test_uses_the_models_own_chat_template(engine: OrtGenaiEngine) -> None:
    plain = len(engine.prompt_tokens(USER))
    with_system = len(engine.prompt_tokens(({"role": "system", "content": "S"},) + USER))
    assert with_system > plain  # <|system|> S <|end|> were added by the template


def test_seeded_sampling_is_reproducible(engine: OrtGenaiEngine) -> None:
    params = GenerationParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=3)
    assert engine.generate(USER, params).text == engine.generate(USER, params).text
    assert params.search_options()["do_sample"] is True
    assert GenerationParams(max_new_tokens=1, temperature=0).search_options() == {"do_sample": False}


def test_prompt_beyond_context_is_too_large(engine: OrtGenaiEngine) -> None:
    with pytest.raises(TooLarge, match="context is 512"):
        engine.generate(({"role": "user", "content": "~ " * 400},), GenerationParams(max_new_tokens=4))


def test_past_deadline_raises_timeout(engine: OrtGenaiEngine) -> None:
    with pytest.raises(Timeout):
        engine.generate(USER, GenerationParams(max_new_tokens=64), deadline=time.monotonic() - 1)


def test_missing_folder_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no genai_config.json"):
        OrtGenaiEngine(tmp_path, "cpu")


def test_unknown_tokenizer_class_says_what_to_change(tiny_model: Path, tmp_path: Path) -> None:
    """transformers 5 writes `TokenizersBackend`, which older ORT GenAI (0.11) rejects."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "NoSuchTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        OrtGenaiEngine(folder, "cpu").load()
    assert "Unsupported tokenizer class: NoSuchTokenizer" in str(info.value)
    assert "tokenizer_class in tokenizer_config.json" in str(info.value)


@pytest.mark.parametrize("provider, words", [("cuda", "onnxruntime-genai-cuda"), ("dml", "directml"),
                                             ("openvino", "OpenVINO")])
def test_unavailable_provider_names_the_fix(tiny_model: Path, provider: str, words: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        OrtGenaiEngine(tiny_model, provider, fallback=()).load()
    assert f"provider {provider!r}" in str(info.value) and words in str(info.value)


def test_auto_falls_back_to_cpu(tiny_model: Path) -> None:
    auto = OrtGenaiEngine(tiny_model, "auto")
    auto.load()
    assert auto.provider == "cpu" and auto.provider_reason.startswith("auto")
