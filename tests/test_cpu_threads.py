"""The CPU thread policy (profiling.threads): free cores measured from /proc/stat, the user's choice
kept, the team re-sized during a run, and OpenMP's wait policy set before torch loads."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profiling import threads as cpu

ROOT = Path(__file__).resolve().parents[1]


def stat(*cpus: tuple[int, int]) -> str:
    """/proc/stat text with an aggregate line and one line per CPU: (busy user ticks, idle ticks)."""
    total = (sum(b for b, _ in cpus), sum(i for _, i in cpus))
    lines = [f"cpu  {total[0]} 0 0 {total[1]} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (b, i) in enumerate(cpus)]
    return "\n".join(lines + ["intr 12345", "ctxt 678"]) + "\n"


class Machine:
    """A scripted machine: each CPU gains busy/idle ticks per second; our own process uses
    `own` cores. `reader`, `own_s` and `clock` are what CoreWindow reads."""

    def __init__(self, n: int = 2) -> None:
        self.t, self.own, self.ticks, self.load = 0.0, 0.0, [[0, 0] for _ in range(n)], [0.0] * n

    def advance(self, seconds: float, load: list[float] | None = None, own: float = 0.0) -> None:
        """`load`: each CPU's busy fraction (everyone's, ours included) over the next `seconds`."""
        load = self.load if load is None else load
        for ticks, busy in zip(self.ticks, load):
            ticks[0] += round(100 * seconds * busy)
            ticks[1] += round(100 * seconds * (1 - busy))
        self.t += seconds
        self.own += own * seconds

    def reader(self) -> str:
        return stat(*map(tuple, self.ticks))

    def own_s(self) -> float:
        return self.own

    def clock(self) -> float:
        return self.t

    def window(self, cpus=(0, 1)) -> cpu.CoreWindow:
        return cpu.CoreWindow(list(cpus), reader=self.reader, own=self.own_s, clock=self.clock)


def test_per_cpu_ticks_skip_the_aggregate_line():
    ticks = cpu.cpu_ticks("cpu  9 1 2 50 3 4 5 6 7 8\ncpu0 4 0 1 20 1 2 2 3 0 0\ncpu1 5 1 1 30 2 2 3 3 7 8\nintr 1\n")
    # busy = user nice system irq softirq steal; all = the first 8 columns (guest time is inside user)
    assert ticks == {0: (4 + 0 + 1 + 2 + 2 + 3, 33), 1: (5 + 1 + 1 + 2 + 3 + 3, 47)}
    assert cpu.cpu_ticks(None) == {} and cpu.cpu_ticks("garbage\ncpuX a b\n") == {}


@pytest.mark.parametrize(
    "load, own, free",
    [
        ([1.0, 0.02], 0.0, 1),  # another process spins on cpu0: one core left
        ([1.0, 1.0], 1.0, 1),  # we use one core, someone else the other
        ([0.0, 1.0], 1.0, 2),  # the only busy core is ours: both free
        ([0.3, 0.05], 0.0, 2),  # a light load (0.35 core) takes no core
        ([0.6, 0.1], 0.0, 1),  # 0.7 core does
        ([1.0, 1.0], 0.0, 1),  # both taken: still one thread, never zero
    ],
)
def test_free_cores_are_the_mask_less_what_others_use(load, own, free):
    m = Machine()
    w = m.window().start()
    m.advance(0.3, load, own)
    got = w.stop()
    assert got.free == free
    assert got.others == pytest.approx(max(0.0, sum(load) - own), abs=0.04)
    assert got.busy == pytest.approx({0: load[0], 1: load[1]}, abs=0.04)
    assert f"{free} of 2 CPUs free" in got.describe()


def test_only_the_cpus_of_our_affinity_mask_count():
    m = Machine(4)
    w = m.window(cpus=(2, 3)).start()
    m.advance(1.0, [1.0, 1.0, 0.0, 0.0])  # someone holds cpu0 and cpu1, outside our mask
    got = w.stop()
    assert (got.free, got.others, sorted(got.busy)) == (2, 0.0, [2, 3])


def test_an_unreadable_proc_stat_leaves_the_whole_mask():
    got = cpu.CoreWindow([0, 1], reader=lambda: None, own=lambda: 0.0).start().stop()
    assert got.others is None and got.free == 2 and "load unknown" in got.describe()


def test_the_users_thread_count_is_kept_and_not_measured():
    def reader():
        raise AssertionError("a user's choice is not measured")

    for env in ({"OMP_NUM_THREADS": "2"}, {"MKL_NUM_THREADS": "3"}):
        choice = cpu.choose_threads(environ=env, current=2, cpus=[0, 1], reader=reader)
        assert choice.source == "user" and choice.threads == 2 and "set by the user" in choice.reason
    # torch.set_num_threads(1) called before, on a 2-CPU mask: the user's too
    choice = cpu.choose_threads(environ={}, current=1, cpus=[0, 1], reader=reader)
    assert choice.source == "user" and "torch.set_num_threads(1)" in choice.line()


def test_torchs_default_is_replaced_by_the_measured_free_cores(monkeypatch):
    m = Machine()
    monkeypatch.setattr(cpu.time, "sleep", lambda s: m.advance(s, [0.02, 1.0]))  # cpu1 busy with other work
    choice = cpu.choose_threads(environ={}, current=2, cpus=[0, 1], reader=m.reader, own=m.own_s, clock=m.clock)
    assert (choice.source, choice.threads) == ("measured", 1)
    assert "1 of 2 CPUs free" in choice.line() and "cpu1 100%" in choice.line()
    # two ranks of one node share what is free
    m2 = Machine(4)
    monkeypatch.setattr(cpu.time, "sleep", lambda s: m2.advance(s, [0.0, 0.0, 0.0, 0.0]))
    choice = cpu.choose_threads(
        environ={}, current=4, ranks=2, cpus=[0, 1, 2, 3], reader=m2.reader, own=m2.own_s, clock=m2.clock
    )
    assert choice.threads == 2 and "shared by 2 processes" in choice.reason


def test_the_watch_drops_a_thread_at_once_and_adds_it_back_after_two_quiet_windows():
    m, team, said = Machine(), [2], []
    watch = cpu.ThreadWatch(
        cpu.ThreadChoice(2, "measured", "test"),
        window_s=5.0,
        log=said.append,
        ranks=1,
        set_threads=lambda n: team.append(n),
        get_threads=lambda: team[-1],
        cpus=[0, 1],
        reader=m.reader,
        own=m.own_s,
        clock=m.clock,
    )

    def steps(n, load, own, seconds=1.0):
        changed = []
        for _ in range(n):
            m.advance(seconds, load, own)
            changed.append(watch.step())
        return changed

    assert steps(10, [1.0, 1.0], 2.0) == [False] * 10 and team == [2]  # quiet: both cores are ours
    # another process starts spinning: it gets ~0.7 core of the two, we the rest
    assert steps(5, [1.0, 1.0], 1.3) == [False] * 4 + [True]
    assert team == [2, 1] and "2 -> 1" in said[-1] and "others used 0.70 cores" in said[-1]
    assert steps(10, [1.0, 1.0], 1.0) == [False] * 10  # still busy: stays at 1
    # it ends: the first quiet window (5 steps of 1 s) only marks it, the second agrees
    assert steps(5, [1.0, 0.02], 1.0) == [False] * 5 and team[-1] == 1
    assert steps(5, [1.0, 0.02], 1.0) == [False] * 4 + [True] and team[-1] == 2 and "1 -> 2" in said[-1]
    # a cliff step (25 s) closes the window by itself
    assert steps(1, [1.0, 1.0], 1.0, seconds=25.0) == [True] and team[-1] == 1
    # someone else sets the count: theirs from now on
    team.append(2)
    assert steps(20, [1.0, 1.0], 1.0) == [False] * 20 and not watch.active and "elsewhere" in said[-1]
    assert [c[:2] for c in watch.changes] == [(2, 1), (1, 2), (2, 1)]


def test_the_watch_stays_off_for_a_users_count_several_ranks_or_cuda():
    kw = dict(set_threads=lambda n: pytest.fail("must not set"), get_threads=lambda: 2, reader=lambda: None)
    assert not cpu.ThreadWatch(cpu.ThreadChoice(2, "user", "OMP_NUM_THREADS=2"), ranks=1, **kw).active
    assert not cpu.ThreadWatch(cpu.ThreadChoice(1, "measured", "x"), ranks=2, **kw).active
    watch = cpu.ThreadWatch(None, ranks=1, **kw)  # CUDA runs pass no choice
    assert not watch.active and watch.step() is False


def _load(others: float) -> cpu.FreeCores:
    return cpu.FreeCores(
        cpus=[0, 1], seconds=0.3, busy={0: min(1.0, others), 1: max(0.0, others - 1)}, own=0.0, others=others
    )


def test_configure_openmp_sleeps_waiting_threads_only_where_a_core_is_taken_and_keeps_the_users():
    env = {}
    assert cpu.configure_openmp(env, free=_load(1.0)).startswith("OMP_WAIT_POLICY=PASSIVE: 1 of 2 CPUs free")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert cpu.configure_openmp(env, free=_load(0.2)).startswith("the runtime's default waits: 2 of 2 CPUs free")
    assert env == {}
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}, {"KMP_BLOCKTIME": "0"}):
        env = dict(given)
        assert cpu.configure_openmp(env, free=_load(1.0)).startswith("kept") and env == given


def test_the_look_before_torch_loads_sizes_the_team_without_a_second_look(monkeypatch):
    monkeypatch.setattr(cpu, "_chosen", [])  # torch's count is its default: ours to choose
    monkeypatch.setattr(cpu, "_looks", [(time.monotonic(), _load(1.0))])
    monkeypatch.setattr(cpu, "measure_free_cores", lambda *a, **k: pytest.fail("looked again"))
    choice = cpu.choose_threads(environ={}, current=2, cpus=[0, 1])
    assert choice.threads == 1 and choice.source == "measured"
    monkeypatch.setattr(cpu, "_looks", [(time.monotonic() - cpu.LOOK_FRESH_S - 1, _load(1.0))])  # stale: look again
    monkeypatch.setattr(cpu, "measure_free_cores", lambda *a, **k: _load(0.0))
    assert cpu.choose_threads(environ={}, current=2, cpus=[0, 1]).threads == 2


def _openmp_spin_count(command: list[str], **extra) -> str | None:
    """GOMP_SPINCOUNT as libgomp took it when it loaded in `command` (it prints its settings at
    load with OMP_DISPLAY_ENV=VERBOSE), or None where the runtime is not libgomp."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT), **extra)
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stderr.splitlines():
        if line.strip().startswith("GOMP_SPINCOUNT"):
            return line.split("=")[1].strip().strip("'")
    return None


@pytest.mark.slow
def test_the_console_entry_point_sets_the_wait_policy_before_torch_loads():
    default = _openmp_spin_count([sys.executable, "-c", "import torch"])
    if default is None:
        pytest.skip("torch's OpenMP runtime here is not libgomp (no GOMP_SPINCOUNT in its settings)")
    assert default != "0"  # torch alone: threads spin at barriers
    script = shutil.which("ministack", path=str(Path(sys.executable).parent))
    assert script is not None, "the ministack console script is not installed beside this Python"
    # another process holds a core: the entry points must choose passive waits before torch loads
    # (`ministack sample --help` imports torch, model/sample.py, before argparse prints the help)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert _openmp_spin_count([script, "sample", "--help"]) == "0"  # PASSIVE: no spinning
        assert _openmp_spin_count([sys.executable, "-m", "model", "--help"]) == "0"
        # a user's choice stands
        assert _openmp_spin_count([script, "sample", "--help"], GOMP_SPINCOUNT="12345") == "12345"
    finally:
        busy.kill()
        busy.wait()
