"""The model catalog: its data, what fits which box, where pulled models live, and pulling
(with a fake downloader: nothing can be downloaded here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.settings import catalog
from edge_agent.settings.catalog import (PULLED_MARKER, choose_variant, get_entry, installed, is_catalog_name,
                                load_catalog, partial, pull, resolve_model_path)
from edge_agent.errors import CatalogError, ConfigError
from edge_agent.hardware import Gpu, Hardware
from edge_agent.settings.files import load_settings
from edge_agent.settings.model import Settings

GB = 1024
H100 = Hardware(machine="x86_64", cpu_vendor="amd", cpu_model="EPYC", nvidia_gpus=(Gpu("NVIDIA H100", 80 * GB),),
                memory_total_mb=128 * GB)
ORIN_NANO = Hardware(machine="aarch64", cpu_vendor="arm", cpu_model="Cortex-A78AE",
                     jetson_model="NVIDIA Jetson Orin Nano Developer Kit", memory_total_mb=7 * GB + 700)
PI_4GB = Hardware(machine="aarch64", cpu_vendor="arm", cpu_model="Raspberry Pi 4", memory_total_mb=3 * GB + 800)
SERVER = Hardware(machine="x86_64", cpu_vendor="amd", cpu_model="EPYC", memory_total_mb=32 * GB)
EXPECTED = {"phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3.5-mini-instruct",
            "phi-3-vision-128k-instruct", "phi-3.5-vision-instruct", "phi-3-small-8k-instruct",
            "phi-3-small-128k-instruct", "phi-3-medium-4k-instruct", "phi-3-medium-128k-instruct",
            "phi-3.5-moe-instruct"}


def test_catalog_has_every_model_of_the_issue() -> None:
    entries = load_catalog()
    assert set(entries) == EXPECTED
    for entry in entries.values():
        assert entry.source.startswith("microsoft/") and entry.context > 0 and entry.kind in ("text", "vision")
        assert entry.verified or entry.note, f"{entry.name}: unverified entries must say why"
        for variant in entry.variants:
            assert variant.repo.startswith("microsoft/") and variant.repo.endswith(("-onnx", "-onnx-cpu",
                                                                                   "-onnx-cuda", "-onnx-directml"))
            assert variant.folder and not variant.folder.endswith("/") and variant.memory_gb > variant.size_gb
            assert set(variant.providers) <= {"cpu", "cuda", "dml"}


def test_folders_known_to_be_true() -> None:
    mini = {v.folder for v in get_entry("phi-3.5-mini-instruct").variants}
    assert {"cpu_and_mobile/cpu-int4-awq-block-128-acc-level-4", "cuda/cuda-int4-awq-block-128",
            "cuda/cuda-fp16"} <= mini
    vision = {v.folder for v in get_entry("phi-3.5-vision-instruct").variants}
    assert vision == {"cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4", "gpu/gpu-int4-rtn-block-32"}
    assert get_entry("phi-3.5-moe-instruct").variants == () and not get_entry("phi-3.5-moe-instruct").verified


def test_unknown_name() -> None:
    with pytest.raises(CatalogError, match="no model 'phi-9'"):
        get_entry("phi-9")
    assert not is_catalog_name("phi-9") and not is_catalog_name("models/phi-3.5-mini-instruct")
    assert is_catalog_name("phi-3.5-mini-instruct")


@pytest.mark.parametrize("box, name, expected", [
    (H100, "phi-3.5-mini-instruct", ("cuda", "cuda/cuda-int4-awq-block-128")),
    (H100, "phi-3-medium-4k-instruct", ("cuda", "cuda-int4-rtn-block-32")),
    (ORIN_NANO, "phi-3.5-vision-instruct", ("cuda", "gpu/gpu-int4-rtn-block-32")),
    (ORIN_NANO, "phi-3-medium-4k-instruct", None),  # 10 GB on a 7.7 GB Jetson
    (SERVER, "phi-3-mini-4k-instruct", ("cpu", "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4")),
    (SERVER, "phi-3-small-8k-instruct", None),  # CUDA only
    (PI_4GB, "phi-3-mini-4k-instruct", None),  # needs ~4 GB
])
def test_what_fits(box: Hardware, name: str, expected: tuple[str, str] | None) -> None:
    chosen, checks = choose_variant(get_entry(name), box)
    assert (chosen.provider, chosen.variant.folder) == expected if expected else chosen is None
    if expected is None:
        assert all(not c.ok and c.reason for c in checks)


def test_refusal_reasons_name_the_gap() -> None:
    _, checks = choose_variant(get_entry("phi-3.5-mini-instruct"), SERVER, provider="cuda")
    assert checks and all(c.reason == "needs an NVIDIA GPU or a Jetson; none found" for c in checks)
    _, checks = choose_variant(get_entry("phi-3-mini-4k-instruct"), PI_4GB, provider="cpu")
    assert checks[0].reason == "needs ~4 GB RAM, this box has 3.8 GB"
    _, checks = choose_variant(get_entry("phi-3-mini-4k-instruct"), SERVER, provider="dml")
    assert checks[0].reason == "DirectML runs on Windows only" or sys.platform == "win32"


def test_gpu_memory_unknown_is_allowed() -> None:
    box = Hardware(machine="x86_64", cpu_vendor="intel", cpu_model="Xeon", nvidia_gpus=(Gpu("NVIDIA L4"),))
    chosen, _ = choose_variant(get_entry("phi-3-small-8k-instruct"), box)
    assert chosen is not None and "amount unknown" in chosen.reason


def fake_download(files: dict[str, str]) -> Any:
    calls: list[dict[str, Any]] = []

    def download(**kwargs: Any) -> str:
        calls.append(kwargs)
        for rel, text in files.items():
            path = Path(kwargs["local_dir"]) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return kwargs["local_dir"]

    download.calls = calls  # type: ignore[attr-defined]
    return download


def settings_for(tmp_path: Path, **model: Any) -> Settings:
    return Settings(state_dir=tmp_path / "state", model={"path": "phi-3.5-mini-instruct", **model})


def test_pull_downloads_only_the_variant_folder_and_marks_it(tmp_path: Path) -> None:
    entry = get_entry("phi-3.5-mini-instruct")
    variant = entry.variants[0]
    download = fake_download({f"{variant.folder}/genai_config.json": "{}", f"{variant.folder}/model.onnx": "x"})
    target = pull(entry, variant, tmp_path, download)
    assert download.calls == [{"repo_id": "microsoft/Phi-3.5-mini-instruct-onnx",
                               "allow_patterns": ["cpu_and_mobile/cpu-int4-awq-block-128-acc-level-4/*"],
                               "local_dir": str(tmp_path / "models" / "phi-3.5-mini-instruct")}]
    assert target == tmp_path / "models" / "phi-3.5-mini-instruct" / variant.folder
    assert (target / PULLED_MARKER).is_file() and installed(tmp_path, entry) == [variant]


def test_pull_that_brings_no_model_is_an_error(tmp_path: Path) -> None:
    entry = get_entry("phi-3.5-mini-instruct")
    with pytest.raises(CatalogError, match="has no cpu_and_mobile/.*/genai_config.json"):
        pull(entry, entry.variants[0], tmp_path, fake_download({}))
    assert installed(tmp_path, entry) == []


def test_interrupted_pull_is_partial(tmp_path: Path) -> None:
    entry = get_entry("phi-3.5-mini-instruct")

    def broken(**kwargs: Any) -> str:
        (Path(kwargs["local_dir"]) / entry.variants[0].folder).mkdir(parents=True)
        raise ConnectionError("connection reset")

    with pytest.raises(CatalogError, match="cannot download .*ConnectionError: connection reset"):
        pull(entry, entry.variants[0], tmp_path, broken)
    assert installed(tmp_path, entry) == [] and partial(tmp_path, entry) == [entry.variants[0]]


def test_missing_huggingface_hub_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    entry = get_entry("phi-3.5-mini-instruct")
    with pytest.raises(CatalogError, match=r"pip install 'edge-agent\[hub\]'"):
        pull(entry, entry.variants[0], tmp_path)


def test_real_hub_offline_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    entry = get_entry("phi-3.5-mini-instruct")
    with pytest.raises(CatalogError, match="HF_HUB_OFFLINE is set"):
        pull(entry, entry.variants[0], tmp_path)


def test_resolve_catalog_name_needs_a_pull(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="edge-agent models pull phi-3.5-mini-instruct"):
        resolve_model_path(settings_for(tmp_path))


def test_resolve_catalog_name_to_the_pulled_variant(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    entry = get_entry("phi-3.5-mini-instruct")
    cpu, cuda = entry.variants[0], entry.variants[1]
    for variant in (cpu, cuda):
        pull(entry, variant, settings.state_dir, fake_download({f"{variant.folder}/genai_config.json": "{}"}))
    root = settings.state_dir / "models" / "phi-3.5-mini-instruct"
    assert resolve_model_path(settings, lambda: SERVER) == root / cpu.folder
    assert resolve_model_path(settings, lambda: H100) == root / cuda.folder
    explicit_cpu = settings_for(tmp_path, provider="cpu")
    assert resolve_model_path(explicit_cpu, lambda: H100) == root / cpu.folder


def test_other_paths_pass_through(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, model={"path": str(tmp_path / "my-model")})
    assert resolve_model_path(settings) == tmp_path / "my-model"


def test_toml_keeps_a_catalog_name_bare(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[model]\npath = "phi-3.5-vision-instruct"\n')
    settings, _ = load_settings(config)
    assert str(settings.model.path) == "phi-3.5-vision-instruct"
    config.write_text('[model]\npath = "my-model"\n')  # not a catalog name: relative to the file
    settings, _ = load_settings(config)
    assert settings.model.path == tmp_path / "my-model"


def test_catalog_file_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "catalog.toml"
    other.write_text('[[model]]\nname = "tiny"\nsource = "x/y"\n[[model.variant]]\nproviders = ["cpu"]\n'
                     'repo = "x/y-onnx"\nfolder = "cpu"\nprecision = "fp32"\nsize_gb = 0.01\nmemory_gb = 0.1\n')
    monkeypatch.setenv(catalog.CATALOG_ENV, str(other))
    assert list(load_catalog()) == ["tiny"]
    other.write_text("[[model]\n")
    monkeypatch.setenv(catalog.CATALOG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(CatalogError, match="cannot read the model catalog"):
        load_catalog()
