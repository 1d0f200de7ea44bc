"""Peak FLOP/s of the accelerators people rent, and model FLOPs utilisation (MFU).

The table holds *dense* tensor-core peaks. Vendors also print "with sparsity" figures (2x,
structured 2:4 sparsity) that no dense training or serving run can reach; using them would
halve every MFU. "fp32" is the plain (non-tensor-core) FP32 rate, which is what torch's
default fp32 matmul gets (TF32 is off by default for matmul); "tf32" is listed separately.
Sources: NVIDIA and AMD data sheets (A100, H100, H200, L4, A10, T4, L40S, RTX 4090 Ada
whitepaper with FP32 accumulate, MI300X, MI250X, B200, V100 SXM2).

CPUs have no data sheet figure worth trusting, so "this CPU" is measured by a matmul probe
(`profiling.cpu`).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

TERA = 1e12


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model: its dense peaks in TFLOP/s per dtype and its memory."""

    name: str
    pattern: str  # regex matched against torch.cuda.get_device_name()
    memory_gb: float
    tflops: dict[str, float] = field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; raises with the supported dtypes named."""
        dtype = normalize_dtype(dtype)
        if dtype not in self.tflops:
            raise ValueError(f"{self.name} has no {dtype} peak (known: {', '.join(self.tflops)})")
        return self.tflops[dtype] * TERA

    @property
    def default_dtype(self) -> str:
        """The dtype to plan with when none is named: bf16, or where the accelerator has no bf16
        (T4, V100) its 16-bit tensor format, fp16 (every entry in the table has fp16)."""
        return "bf16" if "bf16" in self.tflops else "fp16"


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("B200", r"B200", 180, {"fp32": 80, "tf32": 1100, "bf16": 2250, "fp16": 2250, "fp8": 4500}),
    Accelerator("H200", r"H200", 141, {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    Accelerator(
        "H100-SXM",
        r"H100(?!.*PCIe)(?!.*NVL)",
        80,
        {"fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    ),
    Accelerator("H100-NVL", r"H100.*NVL", 94, {"fp32": 60, "tf32": 417.5, "bf16": 835, "fp16": 835, "fp8": 1670.5}),
    Accelerator("H100-PCIe", r"H100.*PCIe", 80, {"fp32": 51, "tf32": 378, "bf16": 756, "fp16": 756, "fp8": 1513}),
    Accelerator("A100", r"A100", 80, {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}),
    Accelerator("L40S", r"L40S", 48, {"fp32": 91.6, "tf32": 183, "bf16": 362, "fp16": 362, "fp8": 733}),
    Accelerator("L4", r"\bL4\b", 24, {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121, "fp8": 242.5}),
    Accelerator("A10", r"\bA10\b", 24, {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125}),
    Accelerator("T4", r"\bT4\b", 16, {"fp32": 8.1, "fp16": 65}),  # Turing: no bf16 tensor cores
    # Volta, no bf16; the SXM2 32GB data sheet (V100 PCIe: fp32 14, fp16 112)
    Accelerator("V100", r"V100", 32, {"fp32": 15.7, "fp16": 125}),
    Accelerator("RTX-4090", r"4090", 24, {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    Accelerator(
        "MI300X", r"MI300X", 192, {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9}
    ),
    Accelerator("MI250X", r"MI250X", 128, {"fp32": 95.7, "bf16": 383, "fp16": 383}),
)

_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "fp32": "fp32",
    "32": "fp32",
    "tf32": "tf32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    "16": "fp16",
    "fp8": "fp8",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
}


def normalize_dtype(dtype: object) -> str:
    """'torch.bfloat16', 'bfloat16', 'bf16' -> 'bf16'; raises on anything unknown."""
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r} (known: fp32, tf32, bf16, fp16, fp8)")
    return _DTYPE_ALIASES[key]


def accelerator(name: str) -> Accelerator:
    """Look an accelerator up by table name ('H100-SXM', 'h100') or by a CUDA device name."""
    wanted = name.strip().lower()
    for acc in ACCELERATORS:
        if acc.name.lower() == wanted:
            return acc
    prefix = [a for a in ACCELERATORS if a.name.lower().startswith(wanted)]
    if prefix:
        return prefix[0]
    for acc in ACCELERATORS:
        if re.search(acc.pattern, name, flags=re.IGNORECASE):
            return acc
    known = ", ".join(a.name for a in ACCELERATORS)
    raise ValueError(f"unknown GPU {name!r} (known: {known}, or 'cpu' for this machine)")


@dataclass
class DevicePeak:
    """The peak FLOP/s one device's MFU is computed against, and where that figure came from.

    `observe(achieved)` keeps it an upper bound: a run that achieves more than the peak has
    proven the peak stale, so the peak is raised to what was achieved (on a CPU the cached probe
    too, profiling.cpu.raise_peak) and a warning says so once, instead of an MFU above 100%.
    """

    device: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC (2 threads)"
    dtype: str  # normalized: fp32, bf16, ...
    flops: float  # FLOP/s; 0 when unknown
    source: str  # "data sheet (H100-SXM)", "probe 2026-11-30 20:15 UTC, quiet (...)", "raised to ... (was ...)"
    cpu: bool = False
    origin: str = field(default="", repr=False)  # the source before the first raise
    raises: int = field(default=0, repr=False)

    def observe(self, achieved: float, by: str) -> float:
        """Raise the peak to `achieved` FLOP/s if that exceeds it (`by`: what achieved it, for the
        record); returns the peak now in force. The first raise is said on stderr; later ones
        (each new best step of a run against a stale peak) only change `source`."""
        if self.flops <= 0 or achieved <= self.flops:
            return self.flops
        old, self.origin = self.flops, self.origin or f"{format_rate(self.flops)}, {self.source}"
        if self.cpu:
            from profiling.cpu import raise_peak

            self.flops = raise_peak(self.dtype, achieved, by)
        else:
            self.flops = achieved
        self.raises += 1
        self.source = raised_source(self.flops, by, self.origin)
        if self.raises == 1:
            print(
                f"ministack: {by} achieved {format_rate(achieved)}, above the {self.dtype} peak of {self.device} "
                f"({format_rate(old)}): that peak was stale; raised to {format_rate(self.flops)}"
                f"{' (cached)' if self.cpu else ''}, and again whenever a record beats it (each record keeps "
                "the peak it was computed against)",
                file=sys.stderr,
            )
        return self.flops


def raised_source(flops: float, by: str, was: str) -> str:
    """How a raised peak names its source: 'raised to 95 GFLOP/s by train step 6 (was 50 GFLOP/s, probe ...)'."""
    return f"raised to {format_rate(flops)} by {by} (was {was})"


def format_rate(flops_per_s: float) -> str:
    """'203.2 GFLOP/s', '989.4 TFLOP/s': four significant figures in the unit that fits."""
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.4g} {unit}"
    return f"{flops_per_s:.4g} FLOP/s"


def utc_time(unix: float) -> str:
    """'2026-11-30 20:14 UTC' for a unix time."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix))


def device_peak(device: object, dtype: object) -> DevicePeak:
    """The dense peak of a torch device for `dtype`: a CUDA device's from the table (data sheet),
    the CPU's measured by profiling.cpu (cached per machine; its source names when and under what
    load it was probed, or that it was raised since). Raises ValueError for an unknown GPU or a
    dtype it has no peak for."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    dtype = normalize_dtype(dtype)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        acc = accelerator(name)
        return DevicePeak(name, dtype, acc.peak(dtype), f"data sheet ({acc.name})")
    from profiling.cpu import cpu_name, cpu_peak_entry
    from profiling.load import Load

    entry = cpu_peak_entry()
    peak = entry.get(dtype, entry["fp32"])
    load = Load.from_dict(entry["load"])
    source = f"probe {utc_time(entry['measured_at'])}, {load.describe()}"
    if dtype in entry.get("raised", {}):
        raised = entry["raised"][dtype]
        source = raised_source(
            raised["to"], f"{raised['by']} at {utc_time(raised['at'])}", f"{format_rate(raised['from'])}, {source}"
        )
    return DevicePeak(cpu_name(), dtype, peak, source, cpu=True)


def auto_dtype(device: object) -> Literal["bf16", "fp32"]:
    """The dtype a run computes in when left to choose: bf16 on a GPU; on the CPU bf16 only where
    it is safe and clearly faster than fp32 (measured: profiling.cpu.preferred_cpu_dtype), else
    fp32. Training's `mixed_precision: auto` and the benchmarks ask here, so none decides apart."""
    if str(device).split(":")[0] != "cpu":
        return "bf16"
    from profiling.cpu import preferred_cpu_dtype  # lazy: the probe imports torch

    return "bf16" if preferred_cpu_dtype() == "bf16" else "fp32"


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s divided by the dense peak."""
    if seconds <= 0 or peak_flops <= 0:
        return 0.0
    return flops / seconds / peak_flops
