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
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from profiling.load import _BUSY_COLUMNS, Load, LoadWindow

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

    return f"{_cpuinfo()[0]} ({torch.get_num_threads()} threads)"


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
        _say_once("contended", f"this CPU's matmul peak was measured while the machine was {load.describe()}: "
                               "MFU against it may read high; `ministack flops peak --reprobe` on a quiet machine fixes it")
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
            entry["raised"] = {**entry.get("raised", {}), dtype: {"from": first["from"], "to": achieved, "at": time.time(),
                                                                 "by": by, "raises": first.get("raises", 0) + 1}}
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


# --- Threads: how many cores are free, and how OpenMP's idle threads wait ----------------------
#
# torch's CPU ops run on an OpenMP team (this wheel links its own GNU libgomp: `ldd
# torch/lib/libtorch_cpu.so`), one thread per CPU of the affinity mask by default. A team of two
# on a 2-core machine whose other core is busy with someone else's work falls off a cliff:
# every parallel region waits for the thread that shares its core, and libgomp's threads spin
# at the barriers while they wait, so a step can take several times as long as with one
# thread (bench/busy_core.py). So a process (1) sizes its team to the cores others leave free, measured
# from /proc/stat, (2) lets waiting threads sleep (OMP_WAIT_POLICY=PASSIVE, which the runtime
# reads once, when torch loads it: `configure_openmp` runs in the entry points before `import
# torch`), and (3) during training re-measures as the load comes and goes (ThreadWatch).
# A user's OMP_NUM_THREADS / MKL_NUM_THREADS / torch.set_num_threads, or OMP_WAIT_POLICY /
# GOMP_SPINCOUNT / KMP_BLOCKTIME, is kept as given.

WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")
_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_late_wait: list[str] = []  # a wait policy this process set after torch had loaded (in effect for children only)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
BUSY_CORE_AT = 0.5  # others' load counts as a core taken from 0.5 core up (others' cores are rounded half up)


def configure_openmp(environ: dict | None = None) -> str:
    """Make OpenMP threads that wait at a barrier sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE),
    unless the user chose a wait policy. The runtime reads it once, when `import torch` loads it:
    call this first thing in an entry point. Child processes inherit it. Returns what was done."""
    env = os.environ if environ is None else environ
    given = [f"{k}={env[k]}" for k in _WAIT_VARS if k in env]
    if given:
        return f"kept {', '.join(given)}"
    env[WAIT_POLICY[0]] = WAIT_POLICY[1]
    if environ is None and "torch" in sys.modules:  # too late for this process; its children still get it
        _late_wait.append(WAIT_POLICY[0])
        return f"{WAIT_POLICY[0]}={WAIT_POLICY[1]} set after torch loaded: applies to child processes only"
    return f"{WAIT_POLICY[0]}={WAIT_POLICY[1]}"


def wait_policy() -> str:
    """How this process's OpenMP threads wait, as far as the environment says."""
    given = [f"{k}={os.environ[k]}" for k in _WAIT_VARS if k in os.environ and k not in _late_wait]
    return ", ".join(given) or "spinning (the runtime's default)"


def _read_proc_stat() -> str | None:
    try:
        return Path("/proc/stat").read_text()
    except OSError:
        return None


def cpu_ticks(text: str | None) -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, all ticks)} from /proc/stat's per-CPU lines ("cpu0 ...", not the total).
    Busy as in profiling.load: user nice system irq softirq steal (steal: the hypervisor gave
    the virtual CPU to someone else, so it was not ours to use either)."""
    out = {}
    for line in (text or "").splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            fields = [int(v) for v in rest.split()]
            cpu = int(name[3:])
        except ValueError:
            continue
        out[cpu] = (sum(fields[i] for i in _BUSY_COLUMNS if i < len(fields)), sum(fields[:8]))
    return out


def _own_cpu_s() -> float:
    """CPU-seconds used by this process (all its threads) and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def affinity() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


@dataclasses.dataclass
class FreeCores:
    """What other work left free of our CPUs over one window."""

    cpus: list[int]  # our affinity mask
    seconds: float
    busy: dict[int, float] | None  # per CPU of `cpus`: busy fraction (everyone, us included); None: /proc unreadable
    own: float  # cores this process used on average
    others: float | None  # cores others used on average (the busy sum less our own); None: unknown

    @property
    def taken(self) -> int:
        """Whole cores others hold: their average load rounded half up (BUSY_CORE_AT)."""
        return 0 if self.others is None else math.floor(self.others + 1 - BUSY_CORE_AT)

    @property
    def free(self) -> int:
        """Cores of our mask others leave free: at least 1, at most the mask."""
        return max(1, min(len(self.cpus), len(self.cpus) - self.taken))

    def describe(self) -> str:
        """'1 of 2 CPUs free: others used 1.02 cores over 0.3 s (cpu0 100%, cpu1 4%; this process 0.00)'."""
        n = len(self.cpus)
        if self.others is None:
            return f"{n} of {n} CPUs taken as free: load unknown (no /proc/stat)"
        floor = " (at least 1)" if n - self.taken < 1 else ""
        per_cpu = ", ".join(f"cpu{c} {f:.0%}" for c, f in sorted(self.busy.items()))
        return (f"{self.free} of {n} CPUs free{floor}: others used {self.others:.2f} cores over {self.seconds:.1f} s "
                f"({per_cpu}; this process {self.own:.2f})")


class CoreWindow:
    """Measure the cores other work used between start() and stop(), on our CPUs only, from
    /proc/stat's per-CPU counters less this process's own CPU time. Nothing runs meanwhile: a
    window can be a sleep (at start-up) or the training steps themselves (ThreadWatch).

    `reader` returns /proc/stat's text (or None), `own` this process's CPU-seconds, `clock`
    seconds: injectable, for tests."""

    def __init__(self, cpus: list[int] | None = None, reader=_read_proc_stat, own=_own_cpu_s, clock=time.monotonic) -> None:
        self.cpus = affinity() if cpus is None else list(cpus)
        self.reader, self.own, self.clock = reader, own, clock

    def start(self) -> CoreWindow:
        self._ticks, self._own, self._t = cpu_ticks(self.reader()), self.own(), self.clock()
        return self

    def elapsed(self) -> float:
        return self.clock() - self._t

    def stop(self) -> FreeCores:
        ticks, own, now = cpu_ticks(self.reader()), self.own(), self.clock()
        seconds = max(now - self._t, 1e-9)
        own_cores = max(0.0, (own - self._own) / seconds)
        busy = {}
        for cpu in self.cpus:
            if cpu in ticks and cpu in self._ticks:
                d_busy, d_all = (a - b for a, b in zip(ticks[cpu], self._ticks[cpu]))
                busy[cpu] = min(1.0, max(0.0, d_busy / d_all)) if d_all > 0 else 0.0
        if not busy:
            return FreeCores(self.cpus, seconds, None, own_cores, None)
        others = max(0.0, sum(busy.values()) - own_cores)
        return FreeCores(self.cpus, seconds, busy, round(own_cores, 3), round(others, 3))


def measure_free_cores(seconds: float = 0.3, **window) -> FreeCores:
    """Cores of our affinity mask that other work leaves free, over a `seconds` look."""
    w = CoreWindow(**window).start()
    time.sleep(seconds)
    return w.stop()


@dataclasses.dataclass
class ThreadChoice:
    threads: int
    source: str  # "user" (kept as given) or "measured"
    reason: str

    def line(self) -> str:
        return f"intra-op threads {self.threads}: {self.reason}"


_chosen: list[int] = []  # the thread count this process's policy last set (empty: never)


def user_threads(environ: dict | None = None, cpus: list[int] | None = None, current: int | None = None) -> str | None:
    """Why the thread count is the user's, or None when it is ours to choose: OMP_NUM_THREADS or
    MKL_NUM_THREADS set, or torch.set_num_threads called (torch's count, `current`, differs from
    its default, one thread per CPU of the mask, and from the last count this policy set)."""
    env = os.environ if environ is None else environ
    given = [f"{k}={env[k]}" for k in _THREAD_VARS if env.get(k)]
    if given:
        return f"{', '.join(given)} set by the user"
    if current is None:
        import torch

        current = torch.get_num_threads()
    cpus = affinity() if cpus is None else cpus
    if current != (_chosen[-1] if _chosen else len(cpus)):
        return f"torch.set_num_threads({current}) called before (the default here: {len(cpus)})"
    return None


def choose_threads(seconds: float = 0.3, ranks: int = 1, environ: dict | None = None, current: int | None = None,
                   **window) -> ThreadChoice:
    """The intra-op thread count for this process: the user's where given (`current`: torch's
    count now, read when None), else the cores of our affinity mask that other work leaves free
    (measured over `seconds`; `window`: CoreWindow's arguments), shared by the `ranks` processes
    of this node, at least 1."""
    cpus = window.pop("cpus", None) or affinity()
    user = user_threads(environ, cpus, current)
    if user is not None:
        if current is None:
            import torch

            current = torch.get_num_threads()
        return ThreadChoice(current, "user", user)
    free = measure_free_cores(seconds, cpus=cpus, **window)
    threads = max(1, free.free // max(1, ranks))
    share = f", shared by {ranks} processes on this node" if ranks > 1 else ""
    return ThreadChoice(threads, "measured", f"{free.describe()}{share}")


def apply_thread_policy(seconds: float = 0.3, ranks: int | None = None, log=None) -> ThreadChoice:
    """Choose (choose_threads) and set torch's intra-op thread count; say what and why
    (`log`, default stderr; rank 0 of a node only). `ranks`: training processes on this node
    (default $LOCAL_WORLD_SIZE)."""
    import torch

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ranks is None else ranks
    choice = choose_threads(seconds, ranks)
    if choice.source == "measured":
        torch.set_num_threads(choice.threads)
        _chosen.append(choice.threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        (log or _stderr)(f"ministack: {choice.line()}; OpenMP waits: {wait_policy()}")
    return choice


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ThreadWatch:
    """Re-decides the intra-op thread count while a run goes on: others' load is measured over the
    run's own steps (a CoreWindow of at least `window_s`, read between steps: no extra work, no
    sleep) and the team resized to the cores left free. Fewer threads at once (a busy partner
    core costs up to 15x), more only when two windows in a row agree (a wrong guess low costs at
    most the idle core). Inactive where the user set the count, with several ranks on the node
    (each would count the others as load), or once something else changes the count.

    Call `step()` once per training step: True when it changed the count (the MFU's peak, cached
    per thread count, must then be read again)."""

    def __init__(self, choice: ThreadChoice | None, window_s: float = 5.0, log=None, ranks: int | None = None,
                 set_threads=None, get_threads=None, **window) -> None:
        import torch

        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ranks is None else ranks
        self.active = choice is not None and choice.source == "measured" and ranks == 1
        self.threads = choice.threads if choice is not None else None
        self.window_s, self.log = window_s, log or _stderr
        self.set_threads, self.get_threads = set_threads or torch.set_num_threads, get_threads or torch.get_num_threads
        self.window = CoreWindow(**window)
        self.pending_up: int | None = None
        self.changes: list[tuple[int, int, str]] = []  # (from, to, why)
        if self.active:
            self.window.start()

    def step(self) -> bool:
        if not self.active or self.window.elapsed() < self.window_s:
            return False
        if self.get_threads() != self.threads:  # someone else set it: theirs from now on
            self.active = False
            self.log(f"ministack: intra-op threads set to {self.get_threads()} elsewhere: no longer adapted to the load")
            return False
        free = self.window.stop()
        self.window.start()
        want = free.free
        if want > self.threads and self.pending_up != want:
            self.pending_up = want  # wait for a second window to agree
            return False
        self.pending_up = None
        if want == self.threads:
            return False
        why = free.describe()
        self.log(f"ministack: intra-op threads {self.threads} -> {want}: {why}")
        self.changes.append((self.threads, want, why))
        self.set_threads(want)
        self.threads = want
        _chosen.append(want)
        return True
