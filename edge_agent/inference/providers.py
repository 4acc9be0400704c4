"""Execution provider choice. ORT GenAI's `is_*_available()` are unreliable (they say True on
the CPU build), so a provider counts as available only once a model has loaded with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime_genai as og

from edge_agent.errors import ModelLoadError

# Our setting value -> the name ORT GenAI's Config.append_provider expects.
OG_PROVIDER_NAMES = {"cuda": "cuda", "NvTensorRtRtx": "NvTensorRtRtx", "openvino": "OpenVINO",
                     "qnn": "QNN", "dml": "dml"}
INSTALL_HINTS = {
    "cuda": "pip install onnxruntime-genai-cuda (NVIDIA GPU or Jetson with CUDA)",
    "NvTensorRtRtx": "pip install onnxruntime-genai-trt-rtx (NVIDIA RTX GPU)",
    "dml": "pip install onnxruntime-genai-directml (Windows)",
    "openvino": "an ONNX Runtime GenAI build with the OpenVINO provider",
    "qnn": "an ONNX Runtime GenAI build with the QNN provider (Qualcomm)",
}


def configured_providers(genai_config: dict[str, Any]) -> list[str]:
    """Providers the model folder itself asks for (empty: CPU)."""
    session = genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
    names: list[str] = []
    for entry in session.get("provider_options", []):
        names.extend(entry.keys())
    return names


def _load(folder: Path, provider: str | None) -> Any:
    config = og.Config(str(folder))
    if provider is not None:
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(OG_PROVIDER_NAMES[provider])
    return og.Model(config)


def apply_provider(folder: Path, requested: str, folder_providers: list[str]) -> tuple[Any, str, str]:
    """Load the model; returns (model, provider used, why)."""
    if requested == "auto":
        # Until automatic hardware detection lands: the folder's own choice, then the CPU.
        attempts: list[tuple[str | None, str]] = []
        if folder_providers:
            attempts.append((None, f"auto: provider of the model folder ({', '.join(folder_providers)})"))
        attempts.append(("cpu", "auto: CPU" + (" after the folder's provider failed" if folder_providers else "")))
    else:
        attempts = [(requested, "configured")]
    failures: list[str] = []
    for provider, reason in attempts:
        try:
            model = _load(folder, provider)
        except Exception as exc:  # ORT GenAI raises plain RuntimeError
            failures.append(f"{provider or '/'.join(folder_providers)}: {exc}")
            continue
        used = provider or (folder_providers[0] if folder_providers else "cpu")
        return model, used, reason
    hint = INSTALL_HINTS.get(requested, "")
    raise ModelLoadError(f"cannot load {folder} with provider {requested!r}: " + "; ".join(failures)
                         + (f" (to add it: {hint})" if hint else ""))
