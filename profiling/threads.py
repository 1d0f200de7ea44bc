"""Threads: how many cores are free, and how OpenMP's idle threads wait.

Split from profiling.cpu (which decides dtypes and measures peaks): this module sizes torch's
intra-op team to the cores other work leaves free and sets OpenMP's wait policy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from profiling.load import _BUSY_COLUMNS
#
# torch's CPU ops run on an OpenMP team (this wheel links its own GNU libgomp: `ldd
# torch/lib/libtorch_cpu.so`), one thread per CPU of the affinity mask by default. A team of two
# on a 2-core machine whose other core is busy with someone else's work falls off a cliff:
# every parallel region waits for the thread that shares its core, and libgomp's threads spin
# at the barriers while they wait, so a step can take several times as long as with one
# thread (bench/busy_core.py). So a process (1) sizes its team to the cores others leave free, measured
# from /proc/stat, and (2) during training re-measures as the load comes and goes (ThreadWatch).
# (3) The wait policy, which the runtime reads once, when torch loads it (`configure_openmp` runs
# in the entry points before `import torch`), is chosen from a look at the load then: where a
# core is taken, waiting threads sleep (OMP_WAIT_POLICY=PASSIVE), so a team later raised to every
# core cannot spin against the other work; where every core is free, the runtime's default (spin
# a little, then sleep) stays, because passive waits cost small steps dearly: the digits demo's
# step (8x8 patches, a few hundred tokens) ran 1.6x slower with two passive threads than with
# two spinning ones on a quiet 2-core machine, slower than one thread (bench/busy_core.py).
# A user's OMP_NUM_THREADS / MKL_NUM_THREADS / torch.set_num_threads, or OMP_WAIT_POLICY /
# GOMP_SPINCOUNT / KMP_BLOCKTIME, is kept as given.

WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")
_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_late_wait: list[str] = []  # a wait policy this process set after torch had loaded (in effect for children only)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
BUSY_CORE_AT = 0.5  # others' load counts as a core taken from 0.5 core up (others' cores are rounded half up)
LOOK_FRESH_S = 10.0  # configure_openmp's look at the load serves choose_threads this long (no second 0.3 s wait)


_looks: list[tuple[float, FreeCores]] = []  # (monotonic time, result) of configure_openmp's look at the load


def configure_openmp(environ: dict | None = None, free: FreeCores | None = None, seconds: float = 0.3) -> str:
    """Choose how OpenMP threads wait at a barrier, unless the user chose: sleep (OMP_WAIT_POLICY=
    PASSIVE) where others hold a core of our mask, the runtime's default where every core is free.
    `free`: the load (measured over `seconds` when None; the look is kept for apply_thread_policy).
    The runtime reads the policy once, when `import torch` loads it: call this first thing in an
    entry point. Child processes inherit it. Returns what was done."""
    env = os.environ if environ is None else environ
    given = [f"{k}={env[k]}" for k in _WAIT_VARS if k in env]
    if given:
        return f"kept {', '.join(given)}"
    if free is None:
        free = measure_free_cores(seconds)
        _looks.append((time.monotonic(), free))
    if free.taken == 0:
        return f"the runtime's default waits: {free.describe()}"
    env[WAIT_POLICY[0]] = WAIT_POLICY[1]
    if environ is None and "torch" in sys.modules:  # too late for this process; its children still get it
        _late_wait.append(WAIT_POLICY[0])
        return f"{WAIT_POLICY[0]}={WAIT_POLICY[1]} set after torch loaded: applies to child processes only"
    return f"{WAIT_POLICY[0]}={WAIT_POLICY[1]}: {free.describe()}"


def wait_policy() -> str:
    """How this process's OpenMP threads wait, as far as the environment says."""
    given = [f"{k}={os.environ[k]}" for k in _WAIT_VARS if k in os.environ and k not in _late_wait]
    return ", ".join(given) or "the runtime's default (spin a little, then sleep)"


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
        return (
            f"{self.free} of {n} CPUs free{floor}: others used {self.others:.2f} cores over {self.seconds:.1f} s "
            f"({per_cpu}; this process {self.own:.2f})"
        )


class CoreWindow:
    """Measure the cores other work used between start() and stop(), on our CPUs only, from
    /proc/stat's per-CPU counters less this process's own CPU time. Nothing runs meanwhile: a
    window can be a sleep (at start-up) or the training steps themselves (ThreadWatch).

    `reader` returns /proc/stat's text (or None), `own` this process's CPU-seconds, `clock`
    seconds: injectable, for tests."""

    def __init__(
        self, cpus: list[int] | None = None, reader=_read_proc_stat, own=_own_cpu_s, clock=time.monotonic
    ) -> None:
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


def choose_threads(
    seconds: float = 0.3, ranks: int = 1, environ: dict | None = None, current: int | None = None, **window
) -> ThreadChoice:
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
    recent = [f for at, f in _looks if time.monotonic() - at < LOOK_FRESH_S and f.cpus == cpus] if not window else []
    free = recent[-1] if recent else measure_free_cores(seconds, cpus=cpus, **window)
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

    def __init__(
        self,
        choice: ThreadChoice | None,
        window_s: float = 5.0,
        log=None,
        ranks: int | None = None,
        set_threads=None,
        get_threads=None,
        **window,
    ) -> None:
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
            self.log(
                f"ministack: intra-op threads set to {self.get_threads()} elsewhere: no longer adapted to the load"
            )
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
