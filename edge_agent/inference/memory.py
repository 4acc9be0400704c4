"""The memory plan: what the model takes and what the box gives, before the model loads.

- Weights: the model files' size.
- Cache bytes per token: 2 (key, value) × layers × KV heads × head size × bytes per element,
  from `genai_config.json`; float32 caches on CPU (int4 CPU models keep their KV in float32),
  float16 on the GPU providers.
- The budget: `inference.memory_mb`, or (0) the box's: the cgroup limit, else the memory
  available at start, less a reserve for the rest of the box; with a CUDA provider on a
  discrete GPU, the GPU's free memory at start (nvidia-smi) less the same reserve.
- The CPU batching engine keeps one fixed cache for its group from the load on; it gets at most
  half of what the weights leave, or a shorter `batch_max_length`, or batching goes off.
- Reading a prompt, the runtime computes logits for every prompt token (vocabulary × 4 bytes a
  token, float32): held until the first token, then freed (measured: bench/FIT.md).
What is left is the caches' budget: the inference child admits a request only when its cache
(prompt + max_tokens) and its prompt's logits fit in it (child/core.py). The file size is a
guess of what the loaded model holds (measured: twice it for SmolLM2, the runtime repacks int4
weights; less for a model whose float embeddings stay mapped from the file, untouched): the
child measures what the load took and takes what exceeds the plan off the caches' budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_agent.errors import ConfigError, ModelLoadError
from edge_agent.hardware import Hardware, detect
from edge_agent.inference.types import read_genai_config, takes_images

MB = 1024 * 1024
# Left to the rest of the box when the budget is automatic: its OS, the daemon, the broker.
RESERVE_MIN_BYTES = 512 * MB
RESERVE_SHARE = 0.10
BATCH_GROUP = 4  # the runtime's CPU engine batches in fixed groups of 4 (FACTS.md)
MIN_BATCH_LENGTH = 256  # shorter than this, a batch cache is not worth keeping
GPU_PROVIDERS = frozenset({"cuda", "dml", "trt-rtx", "nvtensorrtrtx", "webgpu", "qnn"})
NVIDIA_GPU_PROVIDERS = frozenset({"cuda", "trt-rtx", "nvtensorrtrtx"})  # the model goes to the GPU's own memory
MODEL_SUFFIXES = (".onnx", ".onnx.data", ".data", ".bin")
CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
NO_LIMIT = 1 << 60  # cgroup v1 says "no limit" with a number near 2^63


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_size: int
    element_bytes: int
    vocab: int = 0

    @property
    def logits_bytes_per_token(self) -> int:
        return self.vocab * 4  # the builder's models put out float32 logits on every provider

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * self.element_bytes


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    budget_source: str  # "inference.memory_mb", "cgroup limit" or "available memory"
    weights_bytes: int
    kv_bytes_per_token: int
    batching: bool
    batch_max_length: int
    batch_cache_bytes: int  # the batching engine's fixed group cache (0: batching off)
    batching_note: str | None  # why the plan shortened or turned off batching
    logits_bytes_per_token: int = 0  # a prompt's logits while it is read

    @property
    def load_bytes(self) -> int:
        """What the plan expects the loaded model to hold before any request: the weights and
        the batching engine's group cache (the child warms it at load)."""
        return self.weights_bytes + self.batch_cache_bytes

    @property
    def cache_budget_bytes(self) -> int:
        """What requests' own caches may take at once."""
        return max(0, self.budget_bytes - self.weights_bytes - self.batch_cache_bytes)

    def summary(self, reserved_bytes: int = 0, loaded_bytes: int = 0) -> dict[str, Any]:
        """The status's and stats' `memory` (`reserved_mb`: caches held now; `loaded_mb`: what
        the load took, measured in the inference process; 0 before it)."""
        return {"budget_mb": _mb(self.budget_bytes), "weights_mb": _mb(self.weights_bytes),
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "logits_bytes_per_token": self.logits_bytes_per_token, "loaded_mb": _mb(loaded_bytes),
                "reserved_mb": _mb(self.batch_cache_bytes + reserved_bytes)}

    def explain(self) -> list[str]:
        lines = [f"memory budget: {_mb(self.budget_bytes)} MB ({self.budget_source})",
                 f"model weights: {_mb(self.weights_bytes)} MB",
                 f"cache per token: {self.kv_bytes_per_token} bytes",
                 f"logits per prompt token, while it is read: {self.logits_bytes_per_token} bytes",
                 f"batching engine's cache: {_mb(self.batch_cache_bytes)} MB"
                 + (f" (batch_max_length {self.batch_max_length})" if self.batching else " (batching off)"),
                 f"left for requests' caches: {_mb(self.cache_budget_bytes)} MB "
                 f"(about {self.cache_budget_bytes // max(1, self.kv_bytes_per_token)} tokens at once)"]
        if self.batching_note:
            lines.append(f"batching: {self.batching_note}")
        return lines


def model_shape(genai_config: dict[str, Any], provider: str) -> Shape:
    decoder = genai_config.get("model", {}).get("decoder", {})
    try:
        layers = int(decoder["num_hidden_layers"])
        heads = int(decoder.get("num_attention_heads") or 0)
        kv_heads = int(decoder.get("num_key_value_heads") or heads)
        head_size = int(decoder.get("head_size") or int(decoder["hidden_size"]) // heads)
    except (KeyError, ValueError, ZeroDivisionError, TypeError) as exc:
        raise ModelLoadError(f"genai_config.json has no usable decoder shape ({exc})") from None
    vocab = int(genai_config.get("model", {}).get("vocab_size") or 0)
    return Shape(layers, kv_heads, head_size, 2 if provider.lower() in GPU_PROVIDERS else 4, vocab)


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(MODEL_SUFFIXES))


def gpu_budget_bytes(hw: Hardware) -> tuple[int, str] | None:
    """A discrete NVIDIA GPU's free memory less the reserve (its CUDA context, other users);
    None where the model's memory is the box's (a Jetson shares system RAM, no GPU listed)
    or the driver does not say."""
    if hw.is_jetson or not hw.nvidia_gpus or hw.nvidia_gpus[0].free_mb is None:
        return None
    gpu = hw.nvidia_gpus[0]  # the runtime's default device
    budget, reserve = _less_reserve(gpu.free_mb * MB)
    return budget, f"free memory of GPU 0 ({gpu.name}) less {_mb(reserve)} MB"


def box_budget_bytes() -> tuple[int, str]:
    """The cgroup's limit if it has one, else the memory available now, less the reserve."""
    total, source = _available_bytes(), "available memory"
    for path in CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < NO_LIMIT:
            total, source = min(total, int(text)), "cgroup limit"
            break
    budget, reserve = _less_reserve(total)
    return budget, f"{source} less {_mb(reserve)} MB for the rest of the box"


def _less_reserve(total: int) -> tuple[int, int]:
    """(what is left of `total`, the reserve kept from it)."""
    reserve = max(RESERVE_MIN_BYTES, int(total * RESERVE_SHARE))
    return max(0, total - reserve), reserve


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 40  # unknown: no limit from here


def plan(folder: Path, provider: str, memory_mb: float, batching: bool, batch_max_length: int,
         hardware: Callable[[], Hardware] = detect) -> MemoryPlan:
    """The plan for this model folder on this box. ConfigError when the budget cannot hold the
    weights (it names both figures). `hardware`: looked at only for a CUDA provider."""
    config = read_genai_config(folder)
    shape = model_shape(config, provider)
    weights = weights_bytes(folder)
    gpu = gpu_budget_bytes(hardware()) if not memory_mb and provider.lower() in NVIDIA_GPU_PROVIDERS else None
    if memory_mb:
        budget, source = int(memory_mb * MB), "inference.memory_mb"
    elif gpu is not None:
        budget, source = gpu
    else:
        budget, source = box_budget_bytes()
    if budget < weights:
        raise ConfigError([f"inference.memory_mb: the memory budget is {_mb(budget)} MB ({source}), "
                           f"less than the model's weights alone, {_mb(weights)} MB ({folder})"])
    context = int(config.get("model", {}).get("context_length", 0)) or batch_max_length
    length = min(batch_max_length, context)
    note = None
    group_bytes = 0
    # The child batches only text models whose past and present KV share one buffer (engine.py).
    shares_buffer = bool(config.get("search", {}).get("past_present_share_buffer", True))
    if batching and not takes_images(config) and shares_buffer:
        per_length = BATCH_GROUP * shape.kv_bytes_per_token
        share = (budget - weights) // 2
        if per_length * length > share:
            fitting = share // per_length
            if fitting >= MIN_BATCH_LENGTH:
                note = (f"batch_max_length {length} -> {fitting}: the batching engine's cache of "
                        f"{BATCH_GROUP} × {length} tokens would take {_mb(per_length * length)} MB, more than "
                        f"half of the {_mb(budget - weights)} MB the weights leave")
                length = int(fitting)
            else:
                note = (f"off: even {MIN_BATCH_LENGTH} tokens for a group of {BATCH_GROUP} would take "
                        f"{_mb(per_length * MIN_BATCH_LENGTH)} MB, more than half of the "
                        f"{_mb(budget - weights)} MB the weights leave (inference.memory_mb)")
                batching = False
        group_bytes = per_length * length if batching else 0
    return MemoryPlan(budget, source, weights, shape.kv_bytes_per_token, batching, length, group_bytes, note,
                      shape.logits_bytes_per_token)


def _mb(value: int) -> float:
    return round(value / MB, 1)
