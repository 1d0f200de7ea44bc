"""Peak table, MFU, and this CPU's bf16 verdict and measured peaks."""

import os
import signal
import subprocess
import sys

import pytest

from profiling import cpu, hardware


def test_table_holds_dense_not_sparse_peaks():
    assert hardware.accelerator("H100").peak("bf16") == pytest.approx(989.4e12)  # 1979 is with sparsity
    assert hardware.accelerator("A100").peak("bf16") == pytest.approx(312e12)  # 624 with sparsity
    assert hardware.accelerator("L4").peak("bf16") == pytest.approx(121e12)  # 242 with sparsity
    assert hardware.accelerator("MI300X").peak("bf16") == pytest.approx(1307.4e12)  # 2614.9 with sparsity
    for acc in hardware.ACCELERATORS:  # tensor-core bf16 always beats plain fp32 where it exists
        if "bf16" in acc.tflops:
            assert acc.tflops["bf16"] > acc.tflops["fp32"]


@pytest.mark.parametrize(
    "device_name,expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("AMD Instinct MI300X", "MI300X"),
        ("h100", "H100-SXM"),
        ("a10", "A10"),
    ],
)
def test_device_names_resolve(device_name, expected):
    assert hardware.accelerator(device_name).name == expected


def test_unknown_gpu_and_dtype_are_clear_errors():
    with pytest.raises(ValueError, match="unknown GPU 'Z9000'.*H100-SXM"):
        hardware.accelerator("Z9000")
    with pytest.raises(ValueError, match="T4 has no bf16 peak"):
        hardware.accelerator("T4").peak("bf16")
    with pytest.raises(ValueError, match="unknown dtype"):
        hardware.normalize_dtype("int3")
    assert hardware.normalize_dtype("torch.bfloat16") == "bf16"


def test_mfu():
    assert hardware.mfu(4e14, 2.0, 1e15) == pytest.approx(0.2)
    assert hardware.mfu(1.0, 0.0, 1e15) == 0.0


def test_sigill_child_is_recognised():
    proc = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert cpu._killed_by_sigill(proc)
    assert not cpu._killed_by_sigill(subprocess.run([sys.executable, "-c", "pass"]))


def test_this_cpu_runs_bf16_after_prepare():
    """Whichever CPU kind this is, a bf16 matmul in a fresh process (with the verdict applied) works."""
    cpu.prepare_cpu()
    code = "import torch; print(float((torch.randn(64, 576).bfloat16() @ torch.randn(576, 1536).bfloat16()).float().abs().sum()) > 0)"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    if cpu.bf16_needs_isa_cap():
        assert os.environ[cpu.ISA_ENV] == cpu.ISA_CAP


def test_cpu_peaks_are_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISTACK_CACHE", str(tmp_path))
    cpu.cpu_peaks.cache_clear()
    try:
        peaks = cpu.cpu_peaks()
        assert peaks["fp32"] > 1e9 and peaks["bf16"] > 1e8  # at least a GFLOP/s of fp32 on anything
        cached = list(tmp_path.glob("cpu-*.json"))
        assert len(cached) == 1 and "peaks@" in cached[0].read_text()
        assert cpu.preferred_cpu_dtype() in ("fp32", "bf16")
        name, peak = hardware.device_peak("cpu", "float32")
        assert peak == peaks["fp32"] and "threads" in name
    finally:
        cpu.cpu_peaks.cache_clear()
