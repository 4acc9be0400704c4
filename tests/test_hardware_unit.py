"""Hardware detection on fake /proc, /sys and /etc trees (pure logic: no ORT GenAI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.hardware import Gpu, Hardware, accelerator_candidates, detect
from edge_agent.inference.memory import MB, RESERVE_MIN_BYTES, RESERVE_SHARE, plan as memory_plan

INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i5-1145G7E @ 2.60GHz

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i5-1145G7E @ 2.60GHz
"""
AMD_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
JETSON_CPUINFO = "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nCPU implementer\t: 0x41\n"
PI_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n"
              "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
QCOM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 38.40\nCPU implementer\t: 0x51\nCPU part\t: 0x001\n"
MEMINFO = "MemTotal:        8039124 kB\nMemFree:          123456 kB\nMemAvailable:    6012345 kB\n"
TEGRA_RELEASE = "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19\n"
GPU_INFO = ("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 123\nGPU UUID: \t GPU-1234\n"
            "Bus Location: \t 0000:01:00.0\n")


def write(root: Path, rel: str, content: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def no_smi() -> None:
    return None


def test_jetson_from_device_tree_and_l4t(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", JETSON_CPUINFO)
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "proc/device-tree/model", b"NVIDIA Jetson Orin Nano Developer Kit\0")
    write(tmp_path, "proc/device-tree/compatible", b"nvidia,p3768-0000+p3767-0005\0nvidia,tegra234\0")
    write(tmp_path, "etc/nv_tegra_release", TEGRA_RELEASE)
    hw = detect(tmp_path, machine="aarch64", smi=no_smi)
    assert hw.is_jetson and hw.jetson_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert hw.l4t_release == "R36.3.0" and hw.cpu_vendor == "arm"
    assert hw.memory_total_mb == 7850 and hw.gpu_memory_mb == 7850  # shared memory
    assert accelerator_candidates(hw) == [("cuda", "Jetson found (NVIDIA Jetson Orin Nano Developer Kit)")]


def test_jetson_from_tegra_release_alone(tmp_path: Path) -> None:
    write(tmp_path, "etc/nv_tegra_release", TEGRA_RELEASE)
    hw = detect(tmp_path, machine="aarch64", smi=no_smi)
    assert hw.is_jetson and hw.jetson_model is None
    assert accelerator_candidates(hw)[0] == ("cuda", "Jetson found (R36.3.0)")


def test_nvidia_gpu_from_proc_driver(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", AMD_CPUINFO)
    write(tmp_path, "proc/driver/nvidia/gpus/0000:01:00.0/information", GPU_INFO)
    hw = detect(tmp_path, machine="x86_64", smi=no_smi)
    assert hw.nvidia_gpus == (Gpu("NVIDIA H100 80GB HBM3"),) and not hw.is_jetson
    assert hw.cpu_vendor == "amd" and hw.gpu_memory_mb is None  # only nvidia-smi knows
    assert accelerator_candidates(hw) == [("cuda", "NVIDIA GPU found (NVIDIA H100 80GB HBM3)")]


def test_nvidia_smi_adds_memory(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", INTEL_CPUINFO)
    hw = detect(tmp_path, machine="x86_64", smi=lambda: "NVIDIA H100 80GB HBM3, 81559\nNVIDIA L4, 23034\n")
    assert hw.nvidia_gpus == (Gpu("NVIDIA H100 80GB HBM3", 81559), Gpu("NVIDIA L4", 23034))
    assert hw.gpu_memory_mb == 81559
    # An NVIDIA GPU comes before OpenVINO on an Intel box.
    assert [p for p, _ in accelerator_candidates(hw)] == ["cuda", "openvino"]


def test_intel_cpu_suggests_openvino(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", INTEL_CPUINFO)
    hw = detect(tmp_path, machine="x86_64", smi=no_smi)
    assert hw.cpu_vendor == "intel" and hw.cpu_model.startswith("Intel(R) Core(TM) i5")
    assert accelerator_candidates(hw) == [("openvino", "Intel CPU found (Intel(R) Core(TM) i5-1145G7E @ 2.60GHz)")]


def test_raspberry_pi_has_no_accelerator(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", PI_CPUINFO)
    write(tmp_path, "proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\0")
    write(tmp_path, "proc/device-tree/compatible", b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    hw = detect(tmp_path, machine="aarch64", smi=no_smi)
    assert hw.cpu_vendor == "arm" and hw.cpu_model == "Raspberry Pi 5 Model B Rev 1.0"
    assert not hw.is_jetson and accelerator_candidates(hw) == []


def test_qualcomm_from_device_tree(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", QCOM_CPUINFO)
    write(tmp_path, "sys/firmware/devicetree/base/compatible", b"qcom,qcs6490-rb3gen2\0qcom,qcm6490\0")
    hw = detect(tmp_path, machine="aarch64", smi=no_smi)
    assert hw.qualcomm_soc == "qcom,qcs6490-rb3gen2" and hw.cpu_vendor == "arm"
    assert accelerator_candidates(hw) == [("qnn", "Qualcomm SoC found (qcom,qcs6490-rb3gen2)")]


def test_qualcomm_from_cpu_implementer(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", QCOM_CPUINFO)
    hw = detect(tmp_path, machine="aarch64", smi=no_smi)
    assert hw.qualcomm_soc == "Qualcomm ARM CPU"


def test_empty_tree_finds_nothing_and_never_raises(tmp_path: Path) -> None:
    hw = detect(tmp_path, machine="riscv64", smi=no_smi)
    assert hw == Hardware(machine="riscv64", cpu_vendor="unknown", cpu_model="")
    assert accelerator_candidates(hw) == [] and hw.describe() == ["CPU: unknown (unknown, riscv64)"]


def test_device_node_without_driver_is_noted(tmp_path: Path) -> None:
    write(tmp_path, "dev/nvidia0", "")
    hw = detect(tmp_path, machine="x86_64", smi=no_smi)
    assert not hw.has_nvidia_gpu and "driver not loaded" in hw.notes[0]


@pytest.mark.parametrize("output", ["", "garbage without comma\n", "No devices were found\n", None])
def test_odd_nvidia_smi_output(tmp_path: Path, output: str | None) -> None:
    hw = detect(tmp_path, machine="x86_64", smi=lambda: output)
    assert not hw.nvidia_gpus and not hw.has_nvidia_gpu


def test_this_box_is_detected_without_error() -> None:
    hw = detect()
    assert hw.machine and hw.describe()


def test_nvidia_smi_free_memory(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", INTEL_CPUINFO)
    hw = detect(tmp_path, machine="x86_64", smi=lambda: "NVIDIA H100 80GB HBM3, 81559, 80010\nNVIDIA L4, 23034, [N/A]\n")
    assert hw.nvidia_gpus == (Gpu("NVIDIA H100 80GB HBM3", 81559, 80010), Gpu("NVIDIA L4", 23034, None))


# --- the memory plan's budget on a CUDA box (inference/memory.py) ------------------------------

def model_folder(tmp_path: Path, weights_mb: int) -> Path:
    """A model folder as the plan reads it: genai_config.json and a weights file of that size."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "genai_config.json").write_text(json.dumps({"model": {
        "context_length": 4096, "vocab_size": 32064,
        "decoder": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "head_size": 96, "hidden_size": 3072}}}))
    with open(folder / "model.onnx.data", "wb") as f:
        f.truncate(weights_mb * MB)
    return folder


def discrete_gpu(free_mb: int) -> Hardware:
    return Hardware("x86_64", "intel", "Xeon", nvidia_gpus=(Gpu("NVIDIA L4", 23034, free_mb),))


def test_cuda_budget_is_the_gpus_free_memory_less_a_reserve(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, 2200)
    plan = memory_plan(folder, "cuda", 0, False, 1024, hardware=lambda: discrete_gpu(20000))
    reserve = max(RESERVE_MIN_BYTES, int(20000 * MB * RESERVE_SHARE))
    assert plan.budget_bytes == 20000 * MB - reserve
    assert plan.budget_source.startswith("free memory of GPU 0 (NVIDIA L4)")
    assert plan.kv_bytes_per_token == 2 * 32 * 32 * 96 * 2  # float16 on the GPU


def test_a_full_gpu_is_a_settings_error_naming_both_figures(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, 2200)
    with pytest.raises(ConfigError, match=r"less than the model's weights alone, 2200.0 MB") as caught:
        memory_plan(folder, "cuda", 0, False, 1024, hardware=lambda: discrete_gpu(1500))
    assert "free memory of GPU 0" in str(caught.value.problems)


def test_the_box_budget_where_the_gpu_says_nothing_or_shares_ram(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, 1)
    unknown = Hardware("x86_64", "intel", "Xeon", nvidia_gpus=(Gpu("NVIDIA L4", 23034, None),))
    jetson = Hardware("aarch64", "arm", "Orin", jetson_model="NVIDIA Jetson AGX Orin",
                      nvidia_gpus=(Gpu("Orin", None, 30000),))
    for hw in (unknown, jetson):
        plan = memory_plan(folder, "cuda", 0, False, 1024, hardware=lambda hw=hw: hw)
        assert "GPU" not in plan.budget_source and plan.budget_source.startswith(("available memory", "cgroup"))
    # A CPU provider never asks the GPU; inference.memory_mb wins over both.
    never = lambda: pytest.fail("the hardware was looked at")  # noqa: E731
    assert "GPU" not in memory_plan(folder, "cpu", 0, False, 1024, hardware=never).budget_source
    assert memory_plan(folder, "cuda", 3000, False, 1024, hardware=never).budget_source == "inference.memory_mb"
