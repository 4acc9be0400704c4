"""`edge-agent providers` and `edge-agent models list|pull|verify` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import cuda_missing


def run(*args: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


@pytest.fixture
def config(tmp_path: Path, tiny_model: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[model]\npath = "{tiny_model}"\n')
    return path


def test_providers_report(config: Path, tiny_model: Path) -> None:
    result = run("providers", "--json", config=config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == str(tiny_model) and report["hardware"]["machine"]
    assert report["packages"]["onnxruntime-genai"]
    rows = {row["provider"]: row for row in report["results"]}
    assert set(rows) == {"cpu", "cuda", "NvTensorRtRtx", "openvino", "qnn", "dml"}
    assert rows["cpu"]["ok"] and rows["cpu"]["error"] is None
    assert not rows["cuda"]["ok"] and cuda_missing(tiny_model) in rows["cuda"]["error"]
    assert "pip install onnxruntime-genai-cuda" in rows["cuda"]["hint"]
    assert report["auto"]["provider"] == "cpu" and report["auto"]["reason"].startswith("auto: ")
    assert report["batching"]["mode"] in ("static", "off") and report["batching"]["reason"]


def test_providers_text_without_a_model(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\npath = "{tmp_path / "none"}"\n')
    result = run("providers", config=config)
    assert result.returncode == 0, result.stderr
    assert "Hardware:" in result.stdout and "onnxruntime-genai " in result.stdout
    assert "Load test: skipped" in result.stdout and "no genai_config.json" in result.stdout


def test_providers_text_with_the_model(config: Path) -> None:
    result = run("providers", config=config)
    assert result.returncode == 0, result.stderr
    assert "auto would use: cpu" in result.stdout and "to add it: pip uninstall onnxruntime-genai" in result.stdout


def test_models_list(config: Path) -> None:
    result = run("models", "list", "--json", config=config)
    assert result.returncode == 0, result.stderr
    listed = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert "phi-3.5-vision-instruct" in listed and listed["phi-3.5-vision-instruct"]["installed"] == []
    assert listed["phi-3-small-8k-instruct"]["fits"] is None or listed["phi-3-small-8k-instruct"]["fits"][
        "provider"] == "cuda"
    text = run("models", "list", config=config)
    assert text.returncode == 0 and "phi-3.5-moe-instruct" in text.stdout and "note:" in text.stdout


def test_models_pull_refuses_what_the_box_cannot_run(config: Path) -> None:
    hardware = json.loads(run("providers", "--json", config=config).stdout)["hardware"]
    if hardware["nvidia_gpus"] or hardware["l4t_release"] or hardware["jetson_model"]:
        pytest.skip("this box has an NVIDIA GPU")
    result = run("models", "pull", "phi-3.5-mini-instruct", "--provider", "cuda", config=config)
    assert result.returncode == 1
    assert "refusing" in result.stderr and "needs an NVIDIA GPU or a Jetson" in result.stderr
    assert "--force" in result.stderr


def test_models_pull_offline_is_a_clear_error(config: Path) -> None:
    pytest.importorskip("huggingface_hub")
    result = run("models", "pull", "phi-3.5-mini-instruct", "--provider", "cpu", "--force", config=config,
                 HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "cannot download microsoft/Phi-3.5-mini-instruct-onnx" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr


def test_models_pull_of_nothing(config: Path) -> None:
    result = run("models", "pull", "phi-3.5-moe-instruct", config=config)
    assert result.returncode == 1 and "nothing to pull" in result.stderr and "builder" in result.stderr
    result = run("models", "pull", "phi-9", config=config)
    assert result.returncode == 1 and "no model 'phi-9'" in result.stderr


def test_models_verify_tiny(config: Path, tiny_model: Path) -> None:
    result = run("models", "verify", str(tiny_model), "--json", config=config)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["provider"] == "cpu" and out["tokens"] == 32 and out["tokens_per_s"] > 0
    assert out["reason"].startswith("auto: ")
    text = run("models", "verify", "--provider", "cpu", "--tokens", "8", config=config)
    assert text.returncode == 0 and "tokens/s" in text.stdout and "provider: cpu" in text.stdout


def test_models_verify_strict_cuda_fails(config: Path) -> None:
    result = run("models", "verify", "--provider", "cuda", "--strict", config=config)
    assert result.returncode == 1 and "pip install onnxruntime-genai-cuda" in result.stderr


def test_models_verify_unpulled_catalog_name(config: Path) -> None:
    result = run("models", "verify", "phi-3.5-mini-instruct", config=config)
    assert result.returncode == 78 and "edge-agent models pull phi-3.5-mini-instruct" in result.stderr
