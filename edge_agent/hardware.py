"""What accelerator this box has, read from /proc, /sys and /etc (pure: no ORT GenAI).

Every reader takes the filesystem root, so tests build a fake tree under tmp_path. Detection
never raises: a file that is missing or unreadable only means "not found".
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SMI_TIMEOUT_S = 5.0
ARM_IMPLEMENTERS = {"0x41": "Arm", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple", "0xc0": "Ampere"}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int | None = None  # None: unknown (only nvidia-smi tells)
    free_mb: int | None = None  # free when looked at (nvidia-smi); None: unknown


@dataclass(frozen=True)
class Hardware:
    machine: str                      # platform.machine(): x86_64, aarch64, ...
    cpu_vendor: str                   # intel | amd | arm | unknown
    cpu_model: str
    jetson_model: str | None = None   # "NVIDIA Jetson AGX Orin Developer Kit"
    l4t_release: str | None = None    # "R36.3.0" from /etc/nv_tegra_release
    nvidia_gpus: tuple[Gpu, ...] = ()
    qualcomm_soc: str | None = None   # first "qcom,..." device-tree compatible string
    memory_total_mb: int | None = None
    memory_available_mb: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def is_jetson(self) -> bool:
        return self.jetson_model is not None or self.l4t_release is not None

    @property
    def has_nvidia_gpu(self) -> bool:
        return bool(self.nvidia_gpus)

    @property
    def gpu_memory_mb(self) -> int | None:
        """Memory a CUDA model can use: Jetson shares system RAM; a discrete GPU its own."""
        if self.is_jetson:
            return self.memory_total_mb
        sizes = [g.memory_mb for g in self.nvidia_gpus if g.memory_mb]
        return max(sizes) if sizes else None

    def describe(self) -> list[str]:
        lines = [f"CPU: {self.cpu_model or 'unknown'} ({self.cpu_vendor}, {self.machine})"]
        if self.memory_total_mb:
            lines.append(f"memory: {self.memory_total_mb} MB total, "
                         f"{self.memory_available_mb or '?'} MB available")
        if self.is_jetson:
            lines.append(f"Jetson: {self.jetson_model or 'unknown model'}"
                         + (f", L4T {self.l4t_release}" if self.l4t_release else ""))
        for gpu in self.nvidia_gpus:
            lines.append(f"NVIDIA GPU: {gpu.name}" + (f", {gpu.memory_mb} MB" if gpu.memory_mb else ""))
        if self.qualcomm_soc:
            lines.append(f"Qualcomm SoC: {self.qualcomm_soc}")
        lines.extend(self.notes)
        return lines


def accelerator_candidates(hw: Hardware) -> list[tuple[str, str]]:
    """Providers this hardware suggests, best first, each with the reason."""
    found: list[tuple[str, str]] = []
    if hw.is_jetson:
        found.append(("cuda", f"Jetson found ({hw.jetson_model or hw.l4t_release})"))
    elif hw.has_nvidia_gpu:
        found.append(("cuda", f"NVIDIA GPU found ({hw.nvidia_gpus[0].name})"))
    if hw.cpu_vendor == "intel":
        found.append(("openvino", f"Intel CPU found ({hw.cpu_model or 'unknown model'})"))
    if hw.qualcomm_soc:
        found.append(("qnn", f"Qualcomm SoC found ({hw.qualcomm_soc})"))
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _device_tree_strings(root: Path, name: str) -> list[str]:
    text = _read(root / "proc/device-tree" / name) or _read(root / "sys/firmware/devicetree/base" / name)
    return [part.strip() for part in (text or "").split("\0") if part.strip()]


def _cpu(root: Path, machine: str) -> tuple[str, str, str | None]:
    """(vendor, model, implementer name) from /proc/cpuinfo."""
    info: dict[str, str] = {}
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
            info[key.strip()] = value.strip()
    vendor_id = info.get("vendor_id", "")
    implementer = ARM_IMPLEMENTERS.get(info.get("CPU implementer", "").lower())
    if vendor_id == "GenuineIntel":
        vendor = "intel"
    elif vendor_id in ("AuthenticAMD", "HygonGenuine"):
        vendor = "amd"
    elif implementer or machine.startswith(("aarch64", "arm")):
        vendor = "arm"
    else:
        vendor = "unknown"
    model = info.get("model name") or info.get("Model") or info.get("Hardware") or (
        f"{implementer} ARM CPU" if implementer else "")
    return vendor, model, implementer


def _l4t_release(root: Path) -> str | None:
    """'# R36 (release), REVISION: 3.0, ...' -> 'R36.3.0'."""
    first = (_read(root / "etc/nv_tegra_release") or "").splitlines()[:1]
    if not first:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first[0])
    return f"R{match.group(1)}.{match.group(2)}" if match else first[0].lstrip("# ").strip() or None


def _proc_gpus(root: Path) -> list[Gpu]:
    gpus = []
    for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        for line in (_read(info) or "").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                gpus.append(Gpu(value.strip()))
    return gpus


def nvidia_smi(timeout: float = SMI_TIMEOUT_S) -> str | None:
    """`nvidia-smi --query-gpu=name,memory.total,memory.free` output, or None when absent or failing."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _smi_gpus(output: str | None) -> list[Gpu]:
    """Lines of `name, total MB[, free MB]` ("[N/A]" where the driver does not say)."""
    gpus = []
    for line in (output or "").splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) < 2:  # not a GPU's line ("No devices were found", a warning)
            continue
        if len(fields) >= 3:
            name, total, free = ", ".join(fields[:-2]), fields[-2], fields[-1]
        else:
            name, total, free = fields[0], fields[1], ""
        if name:
            gpus.append(Gpu(name, int(total) if total.isdigit() else None, int(free) if free.isdigit() else None))
    return gpus


def _meminfo(root: Path) -> tuple[int | None, int | None]:
    values: dict[str, int] = {}
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match.group(1)] = int(match.group(2)) // 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def detect(root: Path = Path("/"), machine: str | None = None,
           smi: Callable[[], str | None] | None = nvidia_smi) -> Hardware:
    """Look at this box (or a fake tree under `root`). `smi=None` skips nvidia-smi."""
    machine = machine or platform.machine()
    vendor, cpu_model, implementer = _cpu(root, machine)
    dt_model = " ".join(_device_tree_strings(root, "model")) or None
    compatible = _device_tree_strings(root, "compatible")
    l4t = _l4t_release(root)
    jetson = dt_model if dt_model and ("jetson" in dt_model.lower() or
                                       any(c.startswith("nvidia,tegra") for c in compatible)) else None
    if jetson is None and l4t is not None:
        jetson = dt_model  # L4T without a readable model: still a Jetson
    gpus = [] if (jetson or l4t) else _proc_gpus(root)
    notes: list[str] = []
    smi_gpus = _smi_gpus(smi()) if smi is not None and not (jetson or l4t) else []
    if smi_gpus:
        gpus = smi_gpus  # same GPUs, with their memory
    elif not gpus and (root / "dev/nvidia0").exists():
        notes.append("/dev/nvidia0 exists but no GPU was listed (driver not loaded?)")
    qcom = next((c for c in compatible if c.startswith("qcom,")), None)
    if qcom is None and implementer == "Qualcomm":
        qcom = cpu_model or "Qualcomm CPU"
    total, available = _meminfo(root)
    return Hardware(machine=machine, cpu_vendor=vendor, cpu_model=cpu_model, jetson_model=jetson,
                    l4t_release=l4t, nvidia_gpus=tuple(gpus), qualcomm_soc=qcom,
                    memory_total_mb=total, memory_available_mb=available, notes=tuple(notes))
