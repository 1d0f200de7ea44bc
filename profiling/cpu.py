"""This CPU: is bf16 safe, is it fast, and what is its measured matmul peak per dtype.

CPUs of the same cloud "kind" differ. One advertises AMX but dies with SIGILL on its first
bf16 matmul through oneDNN unless `ONEDNN_MAX_CPU_ISA` caps it below AMX; one (AVX-512 BF16)
runs bf16 3x faster than fp32; one (AVX2 only) runs it ~100x slower. So nothing is assumed: a child process tries a bf16 matmul (a SIGILL
kills the child, not us), another measures GFLOP/s per dtype, and the verdict is cached per
machine (CPU model + flags + torch version) under $MINISTACK_CACHE or ~/.cache/ministack.

`prepare_cpu()` must run before the first bf16 op of a process: every entry point and the
test suite call it. It caps oneDNN only where the probe saw the fault, so users whose AMX
works keep it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

ISA_ENV = "ONEDNN_MAX_CPU_ISA"
ISA_CAP = "AVX512_CORE_BF16"

_SAFETY_CHILD = """
import torch
a = torch.randn(64, 576).bfloat16(); b = torch.randn(576, 1536).bfloat16()
print(float((a @ b).float().sum()) == float((a @ b).float().sum()))
"""

_PEAK_CHILD = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    best = 0.0
    for n in (256, 512, 1024, 2048):  # grow while a matmul is quick: bf16 without hardware
        a = torch.randn(n, n, dtype=dt); b = torch.randn(n, n, dtype=dt)  # support is ~100x slower
        t = time.perf_counter(); a @ b; once = time.perf_counter() - t
        best = max(best, 2 * n ** 3 / once)
        if once > 0.5:
            break
        reps = max(1, int(0.25 / max(once, 1e-5)))
        for _ in range(2):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    out[name] = best
print(json.dumps(out))
"""


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    """The CPU model string plus the thread count torch uses."""
    import torch

    return f"{_cpuinfo()[0]} ({torch.get_num_threads()} threads)"


def _cache_path() -> Path:
    import torch

    name, flags = _cpuinfo()
    key = hashlib.sha1(f"{name}|{sorted(flags)}|{torch.__version__}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("MINISTACK_CACHE", Path.home() / ".cache" / "ministack"))
    return root / f"cpu-{key}.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(update: dict) -> None:
    path = _cache_path()
    data = {**_load_cache(), **update}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _run_child(code: str, *args: str, cap: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cap:
        env[ISA_ENV] = ISA_CAP
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def _killed_by_sigill(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode in (-signal.SIGILL, 128 + signal.SIGILL)


@functools.lru_cache(maxsize=1)
def bf16_needs_isa_cap() -> bool:
    """True where a bf16 matmul faults unless oneDNN is capped below AMX (probed, cached).

    Only CPUs that advertise AMX can hit the fault, so others skip the child process.
    """
    if ISA_ENV in os.environ or "amx_bf16" not in _cpuinfo()[1]:
        return False
    cached = _load_cache()
    if "bf16_needs_cap" not in cached:
        proc = _run_child(_SAFETY_CHILD, cap=False)
        if not _killed_by_sigill(proc) and proc.returncode != 0:
            raise RuntimeError(f"bf16 safety probe failed: {proc.stderr[-500:]}")
        cached = {"bf16_needs_cap": _killed_by_sigill(proc)}
        _store_cache(cached)
    return bool(cached["bf16_needs_cap"])


def prepare_cpu() -> None:
    """Make bf16 safe in this process: cap oneDNN where (and only where) the probe saw SIGILL."""
    if bf16_needs_isa_cap():
        os.environ[ISA_ENV] = ISA_CAP


@functools.lru_cache(maxsize=None)
def cpu_peaks() -> dict[str, float]:
    """Measured matmul FLOP/s per dtype ('fp32', 'bf16') at torch's thread count (cached)."""
    import torch

    threads = torch.get_num_threads()
    key = f"peaks@{threads}"
    cached = _load_cache()
    if key not in cached:
        proc = _run_child(_PEAK_CHILD, str(threads), cap=bf16_needs_isa_cap())
        if proc.returncode != 0:
            raise RuntimeError(f"CPU matmul probe failed (rc={proc.returncode}): {proc.stderr[-500:]}")
        cached = {key: json.loads(proc.stdout.strip().splitlines()[-1])}
        _store_cache(cached)
    return dict(cached[key])


def cpu_peak_flops(dtype: str) -> float:
    """Measured matmul peak FLOP/s of this CPU for 'fp32' or 'bf16' (fp16 etc. use fp32's)."""
    peaks = cpu_peaks()
    return peaks.get(dtype, peaks["fp32"])


def preferred_cpu_dtype(min_speedup: float = 1.5) -> str:
    """'bf16' where this CPU runs it safely and clearly faster than fp32, else 'fp32'."""
    peaks = cpu_peaks()
    return "bf16" if peaks["bf16"] >= min_speedup * peaks["fp32"] else "fp32"
