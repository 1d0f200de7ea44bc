"""This CPU: is bf16 safe, is it fast, and what is its measured matmul peak per dtype.

CPUs of the same cloud "kind" differ. One advertises AMX but dies with SIGILL on its first
bf16 matmul through oneDNN unless `ONEDNN_MAX_CPU_ISA` caps it below AMX; one (AVX-512 BF16)
runs bf16 3x faster than fp32; one (AVX2 only) runs it ~100x slower. So nothing is assumed: a
child process tries a bf16 matmul (a SIGILL kills the child, not us), another measures GFLOP/s
per dtype, and the verdict is cached per machine (CPU model + flags + torch version) under
$MINISTACK_CACHE or ~/.cache/ministack.

The peak is the denominator of every MFU on this machine, so it must be an upper bound in
practice. The probe keeps the best of several trials and records the machine's load while it
ran (profiling.load): a probe taken while other processes used the cores is cached marked
*contended*, said so once per process, and probed again later; an achieved FLOP/s above the
peak raises it (`raise_peak`), recorded with when and by what. `ministack flops peak` shows the
cache, `--reprobe` measures again.

`prepare_cpu()` must run before the first bf16 op of a process: every entry point and the
test suite call it. It caps oneDNN only where the probe saw the fault, so users whose AMX
works keep it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from profiling.load import Load, LoadWindow

ISA_ENV = "ONEDNN_MAX_CPU_ISA"
ISA_CAP = "AVX512_CORE_BF16"
_DTYPES = ("fp32", "bf16")

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
        for _ in range(3):  # trials: the best is the least disturbed
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

    n = torch.get_num_threads()
    return f"{_cpuinfo()[0]} ({n} thread{'s' if n != 1 else ''})"


def cache_path() -> Path:
    """This machine's cache file: one per CPU model + flags + torch version."""
    import torch

    name, flags = _cpuinfo()
    key = hashlib.sha1(f"{name}|{sorted(flags)}|{torch.__version__}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("MINISTACK_CACHE", Path.home() / ".cache" / "ministack"))
    return root / f"cpu-{key}.json"


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(update: dict) -> None:
    path = cache_path()
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


_peaks: dict[tuple[str, int], dict] = {}  # this process's view of the cache entries: (cache file, threads)
_said: set[str] = set()  # warnings already printed by this process
CONTENDED_RETRY_S = 600.0  # a contended entry is probed again once it is this old (or when the machine is quiet)


def _say_once(key: str, text: str) -> None:
    if key not in _said:
        _said.add(key)
        print(f"ministack: {text}", file=sys.stderr)


@contextlib.contextmanager
def _probe_lock():
    """One probe at a time per machine: ranks that start together must not probe together (each
    would see the other as contention) nor race to write the cache."""
    path = cache_path().with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def probe_peaks(threads: int) -> dict:
    """Measure this CPU's matmul FLOP/s per dtype now, in a child process, with the load beside it.

    Returns {"fp32": FLOP/s, "bf16": FLOP/s, "measured_at": unix time, "load": Load.to_dict()}.
    Square matmuls of growing size (256..2048, while one takes under 0.5 s), three timed trials
    per size, the best kept: a peak must be an upper bound in practice, and interference can only
    slow a trial down. Raises RuntimeError if the child fails.
    """
    window = LoadWindow().start()
    proc = _run_child(_PEAK_CHILD, str(threads), cap=bf16_needs_isa_cap())
    load = window.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"CPU matmul probe failed (rc={proc.returncode}): {proc.stderr[-500:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "measured_at": time.time(), "load": load.to_dict()}


def _quiet_now(seconds: float = 0.3) -> bool:
    """Whether other processes leave the cores free right now (a short look, profiling.load)."""
    window = LoadWindow().start()
    time.sleep(seconds)
    return not window.stop().contended


def _merge(old: dict | None, new: dict) -> dict:
    """The entry to keep after a probe. A quiet probe replaces the entry; a contended one keeps,
    per dtype, the higher of the two figures (any figure measured here is a lower bound on what
    the CPU can do, so the higher is the better peak), and stays marked contended. A raise above
    the new figure stands either way: something really achieved it."""
    merged = dict(new)
    if old is not None and new["load"]["contended"]:
        merged.update({k: max(old.get(k, 0.0), new[k]) for k in _DTYPES})
    raised = {d: r for d, r in (old or {}).get("raised", {}).items() if r["to"] > merged.get(d, 0.0)}
    if raised:
        merged.update({d: r["to"] for d, r in raised.items()}, raised=raised)
    return merged


def cpu_peaks(reprobe: bool = False) -> dict[str, float]:
    """Measured matmul peak FLOP/s per dtype ('fp32', 'bf16') at torch's thread count.

    Cached per machine. A probe taken while other processes used the cores is cached marked
    contended, with a warning naming them, and probed again by the first later process that
    finds the machine quiet (a 0.3 s look) or comes CONTENDED_RETRY_S after it (at once with
    `reprobe`); see `cpu_peak_entry` for the record.
    """
    return {k: v for k, v in cpu_peak_entry(reprobe).items() if k in _DTYPES}


def cpu_peak_entry(reprobe: bool = False) -> dict:
    """The cache entry behind cpu_peaks: the peaks plus `measured_at` (unix time), `load` (the
    machine's load while they were measured, profiling.load) and `raised` (per dtype, when an
    achieved FLOP/s above the peak raised it, see raise_peak)."""
    import torch

    threads = torch.get_num_threads()
    key, memo = f"peaks@{threads}", (str(cache_path()), threads)
    entry = _peaks.get(memo) or _load_cache().get(key)
    contended = entry is not None and entry.get("load", {}).get("contended", True)
    stale = contended and (time.time() - entry.get("measured_at", 0) > CONTENDED_RETRY_S or _quiet_now())
    if entry is None or reprobe or stale:
        with _probe_lock():
            cached = _load_cache().get(key)
            fresh = cached is not None and cached.get("measured_at", 0) > (entry or {}).get("measured_at", 0)
            if fresh and not reprobe:  # another process probed while we waited for the lock
                entry = cached
            else:
                entry = _merge(cached, probe_peaks(threads))
                _store_cache({key: entry})
    _peaks[memo] = entry
    if entry.get("load", {}).get("contended", True):
        load = Load.from_dict(entry["load"])
        _say_once(
            "contended",
            f"this CPU's matmul peak was measured while the machine was {load.describe()}: "
            "MFU against it may read high; `ministack flops peak --reprobe` on a quiet machine fixes it",
        )
    return entry


def raise_peak(dtype: str, achieved: float, by: str) -> float:
    """Raise the cached `dtype` peak to `achieved` FLOP/s, which something (`by`) just reached.
    The entry's `raised[dtype]` keeps the probed figure (`from`), the last raise and their count.

    Achieving more than the peak proves the peak stale (probed under load, or a shape the probe
    does not cover): the cache is corrected, with when and by what, rather than letting an MFU
    above 100% stand. Returns the peak now in force.
    """
    import torch

    threads = torch.get_num_threads()
    key, memo = f"peaks@{threads}", (str(cache_path()), threads)
    current = cpu_peak_entry()  # outside the lock: it may probe, which takes the lock itself
    with _probe_lock():
        entry = dict(_load_cache().get(key) or current)
        old = entry.get(dtype, entry["fp32"])
        if achieved > old:
            entry[dtype] = achieved
            first = entry.get("raised", {}).get(dtype, {"from": old, "raises": 0})  # `from`: the probe's figure
            entry["raised"] = {
                **entry.get("raised", {}),
                dtype: {
                    "from": first["from"],
                    "to": achieved,
                    "at": time.time(),
                    "by": by,
                    "raises": first.get("raises", 0) + 1,
                },
            }
            _store_cache({key: entry})
    _peaks[memo] = entry
    return entry.get(dtype, entry["fp32"])


def cpu_peak_flops(dtype: str) -> float:
    """Measured matmul peak FLOP/s of this CPU for 'fp32' or 'bf16' (fp16 etc. use fp32's)."""
    peaks = cpu_peaks()
    return peaks.get(dtype, peaks["fp32"])


def preferred_cpu_dtype(min_speedup: float = 1.5) -> str:
    """'bf16' where this CPU runs it safely and clearly faster than fp32, else 'fp32'."""
    peaks = cpu_peaks()
    return "bf16" if peaks["bf16"] >= min_speedup * peaks["fp32"] else "fp32"
