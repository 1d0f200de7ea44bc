"""Peak table, MFU, and this CPU's bf16 verdict and measured peaks."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from profiling import cpu, hardware
from profiling.ledger import make_record
from profiling.load import CONTENDED_CORES, Load
from profiling.measure import FlopCount


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


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private peak cache for the test: this process's memo of it is forgotten before and after."""
    monkeypatch.setenv("MINISTACK_CACHE", str(tmp_path))
    cpu._peaks.clear()
    cpu._said.clear()
    yield tmp_path
    cpu._peaks.clear()


def test_cpu_peaks_are_measured_and_cached_with_their_load(cache):
    entry = cpu.cpu_peak_entry()
    assert entry["fp32"] > 1e9 and entry["bf16"] > 1e8  # at least a GFLOP/s of fp32 on anything
    load = entry["load"]
    assert load["others_cores"] is not None and load["seconds"] > 0 and len(load["load_avg"]) == 3
    assert load["contended"] == (load["others_cores"] >= CONTENDED_CORES)
    cached = json.loads(next(cache.glob("cpu-*.json")).read_text())
    assert cached[f"peaks@{torch.get_num_threads()}"] == entry
    assert cpu.preferred_cpu_dtype() in ("fp32", "bf16")
    peak = hardware.device_peak("cpu", "float32")
    now = json.loads(next(cache.glob("cpu-*.json")).read_text())[f"peaks@{torch.get_num_threads()}"]
    assert peak.flops == now["fp32"] and " thread" in peak.device and peak.source.startswith("probe ")
    if not load["contended"]:  # a contended probe is probed again once the machine is quiet (profiling.cpu)
        assert peak.flops == entry["fp32"]


def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_a_probe_under_load_is_marked_said_and_replaced_when_quiet(cache, monkeypatch, capsys):
    load = _busy_loops(os.cpu_count() or 2)  # every core taken by another process
    try:
        time.sleep(0.5)
        entry = cpu.cpu_peak_entry()
    finally:
        for p in load:
            p.kill()
            p.wait()
    assert entry["load"]["contended"] and entry["load"]["others_cores"] > 0.5
    assert any(b["name"].startswith("python") for b in entry["load"]["busy"])  # the busy processes are named
    assert "measured while the machine was contended" in capsys.readouterr().err
    cached = json.loads(next(cache.glob("cpu-*.json")).read_text())
    assert next(iter(cached.values()))["load"]["contended"]  # cached, but marked

    # A later process probes again when it finds the machine quiet, or once the entry is old
    # enough; a quiet probe replaces it, even a lower one.
    quiet = {
        "fp32": entry["fp32"] / 2,
        "bf16": entry["bf16"],
        "measured_at": time.time(),
        "load": Load(1.0, (0.0, 0.0, 0.0), 0.0).to_dict(),
    }
    monkeypatch.setattr(cpu, "probe_peaks", lambda threads: quiet)
    monkeypatch.setattr(cpu, "_quiet_now", lambda: False)
    cpu._peaks.clear()
    assert cpu.cpu_peak_entry() == entry  # still busy, and CONTENDED_RETRY_S has not passed
    monkeypatch.setattr(cpu, "CONTENDED_RETRY_S", 0.0)
    cpu._peaks.clear()
    assert cpu.cpu_peak_entry() == quiet and cpu.cpu_peaks()["fp32"] == entry["fp32"] / 2
    cpu._store_cache({next(iter(cached)): entry})  # contended again, recent: a quiet machine re-probes at once
    monkeypatch.setattr(cpu, "CONTENDED_RETRY_S", 600.0)
    monkeypatch.setattr(cpu, "_quiet_now", lambda: True)
    cpu._peaks.clear()
    assert cpu.cpu_peak_entry() == quiet


def test_the_quick_look_sees_a_busy_machine():
    load = _busy_loops(os.cpu_count() or 2)
    try:
        time.sleep(0.3)
        assert not cpu._quiet_now()
    finally:
        for p in load:
            p.kill()
            p.wait()


def test_a_contended_reprobe_keeps_the_higher_figure_per_dtype():
    busy = Load(1.0, None, 1.5).to_dict()
    old = {"fp32": 100.0, "bf16": 10.0, "measured_at": 1.0, "load": busy}
    new = {"fp32": 80.0, "bf16": 20.0, "measured_at": 2.0, "load": busy}
    assert cpu._merge(old, new) == {"fp32": 100.0, "bf16": 20.0, "measured_at": 2.0, "load": busy}
    quiet = {**new, "load": Load(1.0, None, 0.0).to_dict()}
    assert cpu._merge(old, quiet) == quiet  # a quiet probe is the truth, even where it is lower
    assert Load(1.0, None, None).contended  # nothing seen is not proof of quiet
    raise_ = {"from": 100.0, "to": 150.0, "at": 1.0, "by": "train step 7"}
    merged = cpu._merge({**old, "fp32": 150.0, "raised": {"fp32": raise_}}, quiet)
    assert merged["fp32"] == 150.0 and merged["raised"] == {"fp32": raise_}  # achieved beats a lower probe


def _fake_entry(cache: Path, fp32: float) -> None:
    entry = {"fp32": fp32, "bf16": fp32, "measured_at": time.time(), "load": Load(1.0, None, 0.0).to_dict()}
    cpu._store_cache({f"peaks@{torch.get_num_threads()}": entry})


def test_an_achieved_rate_above_the_cpu_peak_raises_it_in_the_cache_once(cache, capsys):
    _fake_entry(cache, 50e9)
    peak = hardware.device_peak("cpu", "fp32")
    assert peak.flops == 50e9
    assert peak.observe(40e9, by="train step 3") == 50e9 and capsys.readouterr().err == ""
    assert peak.observe(80e9, by="train step 4") == 80e9
    assert "above the fp32 peak" in capsys.readouterr().err
    cpu._peaks.clear()  # a new process sees the raised peak, and where it came from
    again = hardware.device_peak("cpu", "fp32")
    assert again.flops == 80e9 and "raised" in again.source and "train step 4" in again.source
    raised = cpu.cpu_peak_entry()["raised"]["fp32"]
    assert raised["from"] == 50e9 and raised["to"] == 80e9 and raised["by"] == "train step 4"
    # a stale peak is beaten step after step: each raise recorded, said once, the probe's figure kept
    assert again.observe(90e9, by="train step 5") == 90e9 and again.observe(95e9, by="train step 6") == 95e9
    assert capsys.readouterr().err.count("that peak was stale") == 1
    raised = cpu.cpu_peak_entry()["raised"]["fp32"]
    assert (raised["from"], raised["to"], raised["raises"], raised["by"]) == (50e9, 95e9, 3, "train step 6")
    assert again.source.startswith("raised to 95 GFLOP/s by train step 6 (was 80 GFLOP/s, raised")


def test_no_record_carries_an_mfu_above_100_percent(capsys):
    peak = hardware.DevicePeak("NVIDIA Z", "bf16", 1000.0, "data sheet (Z)")
    under = make_record("train", FlopCount({"dense": 500}), {"dense": 1}, 1, 1.0, peak, "s", step=1)
    assert under.mfu == 0.5 and under.peak_flops == 1000.0 and under.peak_source == "data sheet (Z)"
    over = make_record("train", FlopCount({"dense": 3000}), {"dense": 1}, 1, 1.0, peak, "s", step=2)
    assert over.mfu == 1.0 and over.peak_flops == 3000.0 and "raised" in over.peak_source
    assert "train step 2 achieved" in capsys.readouterr().err
    # later records are computed against the raised peak
    assert make_record("train", FlopCount({"dense": 1500}), {"dense": 1}, 1, 1.0, peak, "s", step=3).mfu == 0.5


def test_flops_peak_command_shows_the_cache(cache):
    _fake_entry(cache, 123.4e9)
    from profiling.bandwidth import Bandwidth, _store, device_name

    _store(Bandwidth(device_name("cpu"), 12.5e9, {"copy": 12.5e9}, 1 << 26, 1.8e9, Load(1.0, (0.0, 0.0, 0.0), 0.0)))
    proc = subprocess.run(
        [sys.executable, "-m", "model.flops", "peak"], capture_output=True, text=True, env=dict(os.environ), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "123.4 GFLOP/s" in proc.stdout and "quiet (others 0.00 cores)" in proc.stdout
    assert "memory bandwidth 12.5 GB/s (STREAM copy 12.5 GB/s; 64 MiB arrays)" in proc.stdout  # cached: not probed
    proc = subprocess.run(
        [sys.executable, "-m", "model.flops", "peak", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert json.loads(proc.stdout)["cpu"]["fp32"] == 123.4e9


def test_auto_dtype_is_bf16_on_a_gpu_and_the_measured_choice_on_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu, "preferred_cpu_dtype", lambda: "fp32")
    assert hardware.auto_dtype("cuda") == hardware.auto_dtype("cuda:1") == "bf16"
    assert hardware.auto_dtype("cpu") == hardware.auto_dtype(torch.device("cpu")) == "fp32"
    monkeypatch.setattr(cpu, "preferred_cpu_dtype", lambda: "bf16")
    assert hardware.auto_dtype("cpu") == "bf16"
