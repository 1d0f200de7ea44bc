"""This device's memory bandwidth, probed the way STREAM probes it, and MBU against it.

Decode is bound by bytes, not arithmetic: every weight and every cached K/V is read once per
step. So its utilisation is measured the way the field measures it, as model bandwidth
utilisation (MBU): the bytes a run moved per second over the bytes per second the memory can
move. The bytes are modelled from what ran (serve.engine.traffic); the denominator is probed
here rather than read off a data sheet, because a CPU has no data sheet figure worth trusting
and a GPU's printed figure is one no copy kernel reaches.

The probe is STREAM's Copy (c = a) and Add (c = a + b) on float32 arrays several times larger
than the last-level cache (so every pass goes to DRAM or HBM, not cache), timed best of a few
trials (interference can only slow a trial down), bytes counted as STREAM counts them: Copy
reads one array and writes one, Add reads two and writes one (write-allocate traffic is not
counted, as STREAM does not count it). The higher of the two kernels is the bandwidth.

It is cached per device (its name, the thread count for a CPU, the torch version) beside the
matmul peak (profiling.cpu.cache_path's directory), with the machine's load while it ran
(profiling.load): a probe taken under load is marked contended, said so once, and probed again
once it is CONTENDED_RETRY_S old. The load seen is the CPU's; on a GPU it says nothing of other
processes on the GPU itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from profiling.hardware import utc_time
from profiling.load import Load, LoadWindow

CONTENDED_RETRY_S = 600.0  # as profiling.cpu's: a contended probe is redone once this old
_KERNELS = {"copy": (1, 2), "add": (2, 3)}  # name -> (input arrays, arrays of bytes counted per element)
_said: set[str] = set()


@dataclass(frozen=True)
class Bandwidth:
    """A probed memory bandwidth and what it was probed with."""

    device: str  # "AMD EPYC 7B13 (2 threads)", "NVIDIA H100 80GB HBM3"
    bytes_per_s: float  # the better kernel's
    kernels: dict[str, float]  # bytes/s per STREAM kernel ("copy", "add")
    array_bytes: int  # one array's size
    measured_at: float  # unix time
    load: Load

    @property
    def source(self) -> str:
        """'probe 2026-12-07 23:50 UTC, quiet (others 0.02 cores)': what a report prints beside it."""
        return f"probe {utc_time(self.measured_at)}, {self.load.describe()}"

    def to_dict(self) -> dict:
        return asdict(self) | {"load": self.load.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Bandwidth:
        return cls(**{**data, "load": Load.from_dict(data["load"])})


def format_bandwidth(bytes_per_s: float) -> str:
    """'12.3 GB/s', '3.05 TB/s': decimal units, as memory bandwidth is quoted."""
    for scale, unit in ((1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s")):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.4g} {unit}"
    return f"{bytes_per_s:.4g} B/s"


def mbu(bytes_moved: float, seconds: float, bandwidth: float) -> float:
    """Model bandwidth utilisation: bytes moved per second over the memory's bandwidth (nan where
    either is unknown)."""
    if seconds <= 0 or bandwidth <= 0:
        return math.nan
    return bytes_moved / seconds / bandwidth


def last_level_cache_bytes(device: object) -> int:
    """The device's last-level cache: a GPU's L2 as torch reports it, a CPU's largest cache in
    sysfs (0 where neither says)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0))
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes)


def default_array_bytes(device: object) -> int:
    """Four times the last-level cache, and at least 64 MiB (256 MiB on a GPU): big enough that
    no pass is served from cache."""
    import torch

    floor = (256 if torch.device(device).type == "cuda" else 64) << 20
    return max(4 * last_level_cache_bytes(device), floor)


def _best_rate(fn, bytes_per_pass: int, sync, trials: int) -> float:
    """Bytes per second of the fastest of `trials` timed passes of `fn` (after one warm-up)."""
    fn()
    sync()
    best = math.inf
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return bytes_per_pass / best


def probe_bandwidth(device: object = "cpu", array_bytes: int | None = None, trials: int = 5) -> Bandwidth:
    """Measure `device`'s memory bandwidth now with STREAM's Copy and Add (see the module's
    docstring); `array_bytes`: one array's size (default_array_bytes when None)."""
    import torch

    dev = torch.device(device)
    size = array_bytes or default_array_bytes(dev)
    n = max(1, size // 4)
    a, b, c = (torch.ones(n, dtype=torch.float32, device=dev) for _ in range(3))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    runs = {"copy": lambda: c.copy_(a), "add": lambda: torch.add(a, b, out=c)}
    window = LoadWindow().start()
    kernels = {name: _best_rate(runs[name], _KERNELS[name][1] * n * 4, sync, trials) for name in _KERNELS}
    load = window.stop()
    return Bandwidth(device_name(dev), max(kernels.values()), kernels, n * 4, time.time(), load)


def device_name(device: object) -> str:
    """The name a bandwidth is cached and reported under: a GPU's model, or the CPU's model and
    torch's thread count (the bandwidth a CPU reaches grows with the threads copying)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from profiling.cpu import cpu_name

    return cpu_name()


def cache_file(name: str) -> Path:
    """Where `name`'s probe is cached: beside the matmul peak's cache, one file per device name
    and torch version."""
    import torch

    from profiling.cpu import cache_path

    key = hashlib.sha1(f"{name}|{torch.__version__}".encode()).hexdigest()[:12]
    return cache_path().parent / f"bandwidth-{key}.json"


def cached_bandwidth(name: str) -> Bandwidth | None:
    """The cached probe of the device called `name` (as records and reports name it), or None
    where it was never probed here; probes nothing."""
    try:
        return Bandwidth.from_dict(json.loads(cache_file(name).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(bw: Bandwidth) -> None:
    path = cache_file(bw.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(bw.to_dict(), indent=1))
    os.replace(tmp, path)


def device_bandwidth(device: object = "cpu", reprobe: bool = False, array_bytes: int | None = None) -> Bandwidth:
    """`device`'s memory bandwidth: the cached probe, or a new one where there is none, `reprobe`
    asks, or the cached one was taken under load CONTENDED_RETRY_S ago or more. A contended
    re-probe keeps the higher of the two figures (either is a lower bound on what the memory can
    do). `array_bytes` sizes a new probe only."""
    from profiling.cpu import _probe_lock  # one probe at a time per machine: a matmul probe would disturb it

    name = device_name(device)
    old = cached_bandwidth(name)
    stale = old is not None and old.load.contended and time.time() - old.measured_at > CONTENDED_RETRY_S
    bw = old
    if old is None or reprobe or stale:
        with _probe_lock():
            bw = probe_bandwidth(device, array_bytes)
            if old is not None and bw.load.contended and old.bytes_per_s > bw.bytes_per_s:
                bw = replace(bw, bytes_per_s=old.bytes_per_s, kernels=old.kernels)
            _store(bw)
    if bw.load.contended and name not in _said:
        _said.add(name)
        print(
            f"ministack: the memory bandwidth of {name} was probed while the machine was {bw.load.describe()}: "
            "MBU against it may read high; `ministack flops peak --reprobe` on a quiet machine fixes it",
            file=sys.stderr,
        )
    return bw
