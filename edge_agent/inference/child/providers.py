"""Execution provider choice, proven by loading.

ORT GenAI's `append_provider` never fails and its `is_*_available()` say True on the CPU build,
so a provider counts as available only once `og.Model` has loaded with it. The order tried:
an explicit provider, or for `auto` the accelerators the hardware suggests and then the model
folder's own choice; after that `fallback` (empty = strict).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import onnxruntime_genai as og

from edge_agent.errors import ModelLoadError
from edge_agent.hardware import Hardware, accelerator_candidates, detect
from edge_agent.log import get_logger

log = get_logger("inference")

# Our setting value -> the name ORT GenAI's Config.append_provider expects.
OG_PROVIDER_NAMES = {"cuda": "cuda", "NvTensorRtRtx": "NvTensorRtRtx", "openvino": "OpenVINO",
                     "qnn": "QNN", "dml": "dml"}
ACCELERATORS = tuple(OG_PROVIDER_NAMES)
CUDA_PIP = "pip uninstall onnxruntime-genai && pip install onnxruntime-genai-cuda"
INSTALL_HINTS = {
    # Both wheels install the same `onnxruntime_genai` module: replace, do not add.
    "cuda": f"{CUDA_PIP} (NVIDIA GPU; on a Jetson see the README's Jetson section)",
    # On Linux ORT GenAI reaches NvTensorRtRtx through its CUDA library (measured: the CPU build
    # answers "Cuda interface not available" for it).
    "NvTensorRtRtx": f"{CUDA_PIP} and an ONNX Runtime with the NvTensorRtRtx provider (NVIDIA RTX)",
    "dml": "pip uninstall onnxruntime-genai && pip install onnxruntime-genai-directml (Windows only)",
    "openvino": "an ONNX Runtime GenAI build with the OpenVINO provider (the PyPI CPU wheel has none)",
    "qnn": "an ONNX Runtime GenAI build with the QNN provider (Qualcomm; the PyPI CPU wheel has none)",
}
ERROR_CHARS = 200


def our_name(folder_provider: str) -> str:
    """A genai_config.json provider key ("cuda", "OpenVINO", "QNN", ...) as our setting value."""
    lowered = folder_provider.lower()
    return next((ours for ours in ACCELERATORS if ours.lower() == lowered), folder_provider)


def configured_providers(genai_config: dict[str, Any]) -> list[str]:
    """Providers the model folder itself asks for, as our names (empty: CPU)."""
    session = genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
    names: list[str] = []
    for entry in session.get("provider_options", []):
        names.extend(our_name(key) for key in entry)
    return names


@dataclass(frozen=True)
class Candidate:
    provider: str                     # our name; "cpu" = no accelerator
    source: str                       # hardware | folder | configured | fallback
    why: str
    keep_folder: bool = False         # load the folder's config as is (keeps its provider options)
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Attempt:
    provider: str
    source: str
    error: str | None                 # None: loaded
    ms: float


@dataclass(frozen=True)
class Choice:
    model: Any
    provider: str
    reason: str
    attempts: tuple[Attempt, ...]


def option_text(value: object) -> str:
    """ORT provider options are strings; TOML booleans become "1"/"0"."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def plan(requested: str, fallback: Sequence[str], folder_providers: Sequence[str],
         hardware: Hardware | None, options: Mapping[str, object] | None = None) -> list[Candidate]:
    """The candidates in the order they are tried (pure: no loading)."""
    folder_choice = folder_providers[0] if folder_providers else "cpu"
    found: list[Candidate] = []
    if requested == "auto":
        for provider, why in accelerator_candidates(hardware) if hardware else []:
            found.append(Candidate(provider, "hardware", why))
        found.append(Candidate(folder_choice, "folder", "the model folder's choice", keep_folder=True))
    else:
        found.append(Candidate(requested, "configured", "configured"))
    found.extend(Candidate(p, "fallback", "fallback") for p in fallback)
    # Options go to the provider named in `provider`; under auto, to the first accelerator tried.
    target = requested if requested != "auto" else next(
        (c.provider for c in found if c.provider != "cpu"), None)
    text_options = {k: option_text(v) for k, v in (options or {}).items()}
    ordered: list[Candidate] = []
    for cand in found:
        if any(c.provider == cand.provider for c in ordered):
            continue
        keep = cand.keep_folder or cand.provider == folder_choice
        ordered.append(Candidate(cand.provider, cand.source, cand.why, keep,
                                 text_options if cand.provider == target and cand.provider != "cpu" else {}))
    return ordered


def load_with(folder: Path, cand: Candidate, overlay: str | None = None) -> Any:
    """One load attempt; raises what ORT GenAI raises (RuntimeError). `overlay`: JSON laid over
    the folder's genai_config.json."""
    config = og.Config(str(folder))
    if overlay:
        config.overlay(overlay)
    if not cand.keep_folder:
        config.clear_providers()
        if cand.provider != "cpu":
            config.append_provider(OG_PROVIDER_NAMES.get(cand.provider, cand.provider))
    for key, value in cand.options.items():
        config.set_provider_option(OG_PROVIDER_NAMES.get(cand.provider, cand.provider), key, value)
    return og.Model(config)


def short_error(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 1] + "…"


def try_load(folder: Path, cand: Candidate, overlay: str | None = None) -> tuple[Any, Attempt]:
    started = time.monotonic()
    try:
        model = load_with(folder, cand, overlay)
    except Exception as exc:  # noqa: BLE001 - ORT GenAI raises plain RuntimeError
        return None, Attempt(cand.provider, cand.source, short_error(exc), _ms(started))
    return model, Attempt(cand.provider, cand.source, None, _ms(started))


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def describe(requested: str, candidates: Sequence[Candidate], attempts: Sequence[Attempt]) -> str:
    """Why this provider: 'auto: NVIDIA GPU found (…); cuda failed (…); fell back to cpu'."""
    pieces: list[str] = []
    if requested == "auto":
        hw = [c.why for c in candidates if c.source == "hardware"]
        pieces.append("; ".join(hw) if hw else "no accelerator found")
    pieces.extend(f"{a.provider} failed ({a.error})" for a in attempts if a.error)
    used = next((a for a in attempts if a.error is None), None)
    if used is not None:
        if used.source == "fallback":
            pieces.append(f"fell back to {used.provider}")
        elif used.source == "folder":
            pieces.append(f"{used.provider}, the model folder's choice")
        else:
            pieces.append(f"using {used.provider}")
    return ("auto" if requested == "auto" else "configured") + ": " + "; ".join(pieces)


def choose_and_load(folder: Path, requested: str, fallback: Sequence[str] = ("cpu",),
                    folder_providers: Sequence[str] = (), options: Mapping[str, object] | None = None,
                    hardware_probe: Callable[[], Hardware] = detect, overlay: str | None = None) -> Choice:
    """Load the model with the first candidate that works; ModelLoadError when none does."""
    hardware = hardware_probe() if requested == "auto" else None
    candidates = plan(requested, fallback, folder_providers, hardware, options)
    attempts: list[Attempt] = []
    for cand in candidates:
        model, attempt = try_load(folder, cand, overlay)
        attempts.append(attempt)
        if model is not None:
            return Choice(model, cand.provider, describe(requested, candidates, attempts), tuple(attempts))
        log.warning("provider.failed", provider=cand.provider, source=cand.source, error=attempt.error)
    raise ModelLoadError(_failure_message(folder, requested, fallback, attempts))


def _failure_message(folder: Path, requested: str, fallback: Sequence[str],
                     attempts: Sequence[Attempt]) -> str:
    tried = "; ".join(f"{a.provider}: {a.error}" for a in attempts)
    hints = [f"{a.provider}: {INSTALL_HINTS[a.provider]}" for a in attempts if a.provider in INSTALL_HINTS]
    strict = "" if fallback else " (fallback = [], strict)"
    return (f"cannot load {folder} with provider {requested!r}{strict}: {tried}"
            + (f" (to add it: {'; '.join(hints)})" if hints else ""))
