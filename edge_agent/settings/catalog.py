"""Model catalog: which ONNX packages of which models exist, which one fits this box, where a
pulled one lives (`<state_dir>/models/<name>/<variant folder>`), and pulling one from Hugging Face.

The data is `models/catalog.toml`; huggingface_hub is an optional extra imported only to pull.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

from edge_agent.errors import CatalogError, ConfigError
from edge_agent.hardware import Hardware, accelerator_candidates, detect

if TYPE_CHECKING:
    from edge_agent.settings.model import Settings

CATALOG_ENV = "EDGE_AGENT_CATALOG"
PULLED_MARKER = ".edge-agent-pulled"  # written once a pull finished: the folder is complete
HUB_MISSING = "huggingface_hub is not installed: pip install 'edge-agent[hub]'"
MB_PER_GB = 1024


@dataclass(frozen=True)
class Variant:
    providers: tuple[str, ...]
    repo: str
    folder: str
    precision: str
    size_gb: float
    memory_gb: float
    note: str = ""

    @property
    def label(self) -> str:
        return f"{'/'.join(self.providers)} {self.precision} ({self.folder})"


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    kind: str
    context: int
    source: str
    verified: bool
    variants: tuple[Variant, ...]
    note: str = ""


@dataclass(frozen=True)
class Fit:
    variant: Variant
    provider: str
    ok: bool
    reason: str


def catalog_file() -> Path:
    """$EDGE_AGENT_CATALOG, else the checkout's models/, else the copy a wheel installs."""
    if os.environ.get(CATALOG_ENV):
        return Path(os.environ[CATALOG_ENV])
    checkout = Path(__file__).resolve().parents[2] / "models" / "catalog.toml"
    return checkout if checkout.is_file() else Path(sys.prefix) / "share" / "edge-agent" / "catalog.toml"


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, Entry]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"cannot read the model catalog {path}: {exc}") from exc
    entries: dict[str, Entry] = {}
    for raw in data.get("model", []):
        variants = tuple(Variant(tuple(v["providers"]), v["repo"], v["folder"], v["precision"],
                                 float(v["size_gb"]), float(v["memory_gb"]), v.get("note", ""))
                         for v in raw.get("variant", []))
        entries[raw["name"]] = Entry(raw["name"], raw.get("title", raw["name"]), raw.get("kind", "text"),
                                     int(raw.get("context", 0)), raw.get("source", ""),
                                     bool(raw.get("verified", False)), variants, raw.get("note", ""))
    return entries


def load_catalog(path: Path | None = None) -> dict[str, Entry]:
    return _load(path or catalog_file())


def is_catalog_name(value: str) -> bool:
    """A bare name (no '/') that the catalog knows."""
    if "/" in value or not value:
        return False
    try:
        return value in load_catalog()
    except CatalogError:
        return False


def get_entry(name: str) -> Entry:
    catalog = load_catalog()
    if name not in catalog:
        raise CatalogError(f"no model {name!r} in the catalog (known: {', '.join(catalog)})")
    return catalog[name]


# --- where pulled models live ---------------------------------------------------------------
def model_root(state_dir: Path, name: str) -> Path:
    return state_dir / "models" / name


def variant_dir(state_dir: Path, name: str, variant: Variant) -> Path:
    return model_root(state_dir, name) / variant.folder


def installed(state_dir: Path, entry: Entry) -> list[Variant]:
    """Variants whose pull finished."""
    return [v for v in entry.variants if (variant_dir(state_dir, entry.name, v) / PULLED_MARKER).is_file()]


def partial(state_dir: Path, entry: Entry) -> list[Variant]:
    """Variants with files but no finished pull (an interrupted download: pull again to resume)."""
    done = installed(state_dir, entry)
    return [v for v in entry.variants if v not in done and variant_dir(state_dir, entry.name, v).exists()]


# --- what fits this box -----------------------------------------------------------------------
def box_providers(hw: Hardware) -> list[str]:
    """Providers this box can run catalog variants with, best first (always ending with cpu)."""
    order = [p for p, _ in accelerator_candidates(hw)]
    if sys.platform == "win32":
        order.append("dml")
    return [*dict.fromkeys(order), "cpu"]


def fit(variant: Variant, provider: str, hw: Hardware) -> Fit:
    """Can this box run `variant` with `provider`? Memory is checked against the total."""
    if provider not in variant.providers:
        return Fit(variant, provider, False, f"built for {'/'.join(variant.providers)}, not {provider}")
    if provider in ("cuda", "NvTensorRtRtx") and not (hw.is_jetson or hw.has_nvidia_gpu):
        return Fit(variant, provider, False, "needs an NVIDIA GPU or a Jetson; none found")
    if provider == "dml" and sys.platform != "win32":
        return Fit(variant, provider, False, "DirectML runs on Windows only")
    have = hw.memory_total_mb if provider == "cpu" else hw.gpu_memory_mb
    where = "RAM" if provider == "cpu" or hw.is_jetson else "GPU memory"
    need = round(variant.memory_gb * MB_PER_GB)
    if have is None:
        return Fit(variant, provider, True, f"needs ~{variant.memory_gb:g} GB {where}; amount unknown here")
    if have < need:
        return Fit(variant, provider, False, f"needs ~{variant.memory_gb:g} GB {where}, this box has "
                   f"{have / MB_PER_GB:.1f} GB")
    return Fit(variant, provider, True, f"needs ~{variant.memory_gb:g} GB {where} of {have / MB_PER_GB:.1f} GB")


def choose_variant(entry: Entry, hw: Hardware, provider: str | None = None,
                   folder: str | None = None) -> tuple[Fit | None, list[Fit]]:
    """The first variant that fits (for `provider`, or the box's best), and every check made."""
    # The box's providers first; then the rest, so a refusal can say why each one cannot run.
    providers = [provider] if provider else [*dict.fromkeys(
        [*box_providers(hw), *(p for v in entry.variants for p in v.providers)])]
    checks: list[Fit] = []
    for want in providers:
        for variant in entry.variants:
            if folder and variant.folder != folder:
                continue
            if want in variant.providers:
                checks.append(fit(variant, want, hw))
    chosen = next((c for c in checks if c.ok), None)
    return chosen, checks


# --- model.path may name a catalog entry -------------------------------------------------------
def resolve_model_path(settings: Settings,
                       hardware_probe: Callable[[], Hardware] | None = None) -> Path:
    """`model.path` as a folder: a bare catalog name becomes its pulled variant under the state
    directory (the one for the configured provider, else the box's best); anything else as is."""
    value = str(settings.model.path)
    if not is_catalog_name(value):
        return settings.model.path
    entry = get_entry(value)
    done = installed(settings.state_dir, entry)
    if not done:
        raise ConfigError([f"model.path: {value!r} is a catalog model that is not pulled into "
                           f"{model_root(settings.state_dir, value)}: run `edge-agent models pull {value}`"])
    if len(done) > 1:
        wanted = _provider_order(settings, hardware_probe)
        done.sort(key=lambda v: min((wanted.index(p) for p in v.providers if p in wanted), default=len(wanted)))
    return variant_dir(settings.state_dir, value, done[0])


def _provider_order(settings: Settings, hardware_probe: Callable[[], Hardware] | None) -> list[str]:
    requested = settings.model.provider
    if requested != "auto":
        return [requested, *settings.model.fallback, "cpu"]
    hw = (hardware_probe or detect)()
    return [*box_providers(hw), *settings.model.fallback]


# --- pulling ---------------------------------------------------------------------------------
def pull(entry: Entry, variant: Variant, state_dir: Path,
         download: Callable[..., Any] | None = None) -> Path:
    """Download one variant (resumable: huggingface_hub keeps partial files) and mark it done."""
    if download is None:
        # read by huggingface_hub at import: no usage data in its requests (README, "What leaves the box")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CatalogError(HUB_MISSING) from None
        download = snapshot_download
    root = model_root(state_dir, entry.name)
    target = variant_dir(state_dir, entry.name, variant)
    try:
        root.mkdir(parents=True, exist_ok=True)
        download(repo_id=variant.repo, allow_patterns=[f"{variant.folder}/*"], local_dir=str(root))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; name them for the user
        raise CatalogError(_download_error(variant, exc)) from exc
    if not (target / "genai_config.json").is_file():
        raise CatalogError(f"{variant.repo} has no {variant.folder}/genai_config.json: nothing usable "
                           "was downloaded (the repository may have changed; see models/catalog.toml)")
    (target / PULLED_MARKER).write_text(json.dumps({"repo": variant.repo, "folder": variant.folder}) + "\n")
    return target


def _download_error(variant: Variant, exc: BaseException) -> str:
    text = f"cannot download {variant.repo} {variant.folder}: {type(exc).__name__}: {exc}".strip()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        text += " (HF_HUB_OFFLINE is set, so the hub is not contacted: unset it, or copy the folder in by hand)"
    return text


def describe_entries(entries: Sequence[Entry], state_dir: Path, hw: Hardware) -> list[dict[str, Any]]:
    """Plain data for `models list` (text and --json)."""
    rows = []
    for entry in entries:
        chosen, _ = choose_variant(entry, hw)
        rows.append({
            "name": entry.name, "title": entry.title, "kind": entry.kind, "context": entry.context,
            "verified": entry.verified, "note": entry.note,
            "installed": [str(variant_dir(state_dir, entry.name, v)) for v in installed(state_dir, entry)],
            "partial": [str(variant_dir(state_dir, entry.name, v)) for v in partial(state_dir, entry)],
            "fits": None if chosen is None else {"provider": chosen.provider, "folder": chosen.variant.folder,
                                                 "repo": chosen.variant.repo, "size_gb": chosen.variant.size_gb,
                                                 "why": chosen.reason},
            "variants": [{"providers": list(v.providers), "repo": v.repo, "folder": v.folder,
                          "precision": v.precision, "size_gb": v.size_gb, "memory_gb": v.memory_gb,
                          "note": v.note} for v in entry.variants],
        })
    return rows
