"""Execution provider choice on the real ORT GenAI (CPU build) with the tiny model: every
accelerator fails here the way it does on a box without it, so fallback and strict paths are real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_agent.errors import ModelLoadError
from edge_agent.hardware import Gpu, Hardware
from edge_agent.inference.child.engine import OrtGenaiEngine
from edge_agent.inference.child.providers import Candidate, choose_and_load, option_text, plan
from support import cuda_missing

INTEL = Hardware(machine="x86_64", cpu_vendor="intel", cpu_model="Intel Core i5")
H100 = Hardware(machine="x86_64", cpu_vendor="amd", cpu_model="AMD EPYC", nvidia_gpus=(Gpu("NVIDIA H100"),))
PLAIN = Hardware(machine="aarch64", cpu_vendor="arm", cpu_model="Cortex-A76")


def test_explicit_cuda_falls_back_to_cpu_and_says_why(tiny_model: Path) -> None:
    engine = OrtGenaiEngine(tiny_model, "cuda")  # default fallback ["cpu"]
    with capture_logs() as logs:
        engine.load()
    assert engine.provider == "cpu"
    assert engine.provider_reason.startswith(f"configured: cuda failed ({cuda_missing(tiny_model)}")
    assert engine.provider_reason.endswith("; fell back to cpu")
    assert [(a.provider, a.error is None) for a in engine.provider_attempts] == [("cuda", False), ("cpu", True)]
    assert [e["event"] for e in logs] == ["provider.failed", "model.loaded"]
    assert logs[1]["reason"] == engine.provider_reason


def test_explicit_cuda_strict_fails_naming_the_pip_command(tiny_model: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        OrtGenaiEngine(tiny_model, "cuda", fallback=()).load()
    message = str(info.value)
    assert "provider 'cuda' (fallback = [], strict)" in message and cuda_missing(tiny_model) in message
    assert "pip install onnxruntime-genai-cuda" in message


def test_auto_on_this_box_is_cpu(tiny_model: Path) -> None:
    engine = OrtGenaiEngine(tiny_model, "auto")
    engine.load()
    assert engine.provider == "cpu" and engine.provider_reason.startswith("auto: ")
    assert engine.generate(({"role": "user", "content": "hi"},), _params(4)).completion_tokens == 4


def test_auto_on_an_intel_box_tries_openvino_first(tiny_model: Path) -> None:
    choice = choose_and_load(tiny_model, "auto", ("cpu",), (), hardware_probe=lambda: INTEL)
    assert choice.provider == "cpu"
    assert choice.reason == ("auto: Intel CPU found (Intel Core i5); openvino failed (OpenVINO execution "
                             "provider is not supported in this build.); cpu, the model folder's choice")


def test_auto_on_a_gpu_box_reports_the_cuda_failure(tiny_model: Path) -> None:
    choice = choose_and_load(tiny_model, "auto", ("cpu",), (), hardware_probe=lambda: H100)
    assert choice.provider == "cpu"
    assert choice.reason.startswith(f"auto: NVIDIA GPU found (NVIDIA H100); cuda failed ({cuda_missing(tiny_model)}")


@pytest.fixture
def cuda_folder(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny model with a genai_config.json that asks for CUDA, as the cuda-* folders do."""
    folder = tmp_path / "cuda-model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["provider_options"] = [{"cuda": {"enable_cuda_graph": "0"}}]
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def test_auto_with_a_cuda_folder_falls_back(cuda_folder: Path) -> None:
    engine = OrtGenaiEngine(cuda_folder, "auto")
    engine.load()
    assert engine.provider == "cpu"
    assert f"cuda failed ({cuda_missing(cuda_folder)}" in engine.provider_reason
    assert engine.provider_reason.endswith("fell back to cpu")


def test_auto_strict_with_a_cuda_folder_fails(cuda_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="onnxruntime-genai-cuda"):
        OrtGenaiEngine(cuda_folder, "auto", fallback=()).load()


def test_cpu_explicitly_ignores_the_folders_cuda(cuda_folder: Path) -> None:
    engine = OrtGenaiEngine(cuda_folder, "cpu", fallback=())
    engine.load()
    assert engine.provider == "cpu" and engine.provider_reason == "configured: using cpu"


def test_provider_options_reach_the_provider(tiny_model: Path) -> None:
    # The CPU build cannot prove the option arrived, but set_provider_option must not break the
    # attempt or leak into the CPU fallback (CPU takes no options and would refuse them).
    engine = OrtGenaiEngine(tiny_model, "cuda", provider_options={"device_id": 0, "enable_cuda_graph": False})
    engine.load()
    assert engine.provider == "cpu"


def test_plan_orders_candidates() -> None:
    names = lambda cands: [(c.provider, c.source) for c in cands]  # noqa: E731
    assert names(plan("auto", ("cpu",), (), H100)) == [("cuda", "hardware"), ("cpu", "folder")]
    assert names(plan("auto", ("cpu",), ["cuda"], H100)) == [("cuda", "hardware"), ("cpu", "fallback")]
    assert names(plan("auto", (), [], PLAIN)) == [("cpu", "folder")]
    assert names(plan("qnn", ("openvino", "cpu"), [], None)) == [
        ("qnn", "configured"), ("openvino", "fallback"), ("cpu", "fallback")]
    assert names(plan("cuda", ("cuda", "cpu"), [], None)) == [("cuda", "configured"), ("cpu", "fallback")]


def test_plan_keeps_the_folder_config_for_its_own_provider() -> None:
    cuda = plan("auto", ("cpu",), ["cuda"], H100)[0]
    assert cuda == Candidate("cuda", "hardware", "NVIDIA GPU found (NVIDIA H100)", keep_folder=True)


def test_plan_gives_options_to_the_chosen_accelerator_only() -> None:
    options = {"device_id": 1, "enable_cuda_graph": True}
    cands = plan("auto", ("cpu",), (), H100, options)
    assert cands[0].options == {"device_id": "1", "enable_cuda_graph": "1"} and cands[1].options == {}
    assert all(not c.options for c in plan("cpu", (), (), None, options))
    assert option_text(False) == "0" and option_text(1.5) == "1.5"


def _params(n: int):  # noqa: ANN202 - tiny helper
    from edge_agent.inference import GenerationParams

    return GenerationParams(max_new_tokens=n)
