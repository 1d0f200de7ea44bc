"""What else was using this machine while we measured something.

A matmul probe taken while other processes share the cores reads low (on the 2-core AVX2
machines, half the quiet figure), and every MFU computed against it then reads high. So a
probe is bracketed by two snapshots of the kernel's CPU accounting (Linux `/proc`): the
machine's busy time (`/proc/stat`: user, nice, system, irq, softirq and steal, the time a
hypervisor gave our virtual CPUs to someone else) minus what this process and its children
used is what *others* used, as an average number of cores over the window. Per-process
times (`/proc/<pid>/stat`) name the busiest of them.

Where `/proc` is missing (not Linux) nothing can be seen: `others_cores` is None and the
window counts as unknown, not as quiet.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc/stat's aggregate "cpu" columns that are busy time: user nice system (idle iowait) irq softirq steal
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
# Average cores used by others above which a measurement counts as contended.
CONTENDED_CORES = 0.25


def _machine_busy_s() -> float | None:
    """CPU-seconds all cores have spent busy since boot, or None without /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    return sum(int(fields[i]) for i in _BUSY_COLUMNS if i < len(fields)) / _TICK


def _process_times() -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU-seconds used)} of every process we can read."""
    out = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        rest = text[text.rfind(")") + 2 :].split()
        try:  # fields 14 and 15 of stat(5), utime and stime; `rest` starts at field 3
            out[int(entry.name)] = (name, (int(rest[11]) + int(rest[12])) / _TICK)
        except (IndexError, ValueError):
            continue
    return out


def _own_s() -> float:
    """CPU-seconds used by this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Load:
    """The machine's load over one measurement window."""

    seconds: float  # length of the window
    load_avg: tuple[float, float, float] | None  # the kernel's 1/5/15-minute load averages at the start
    others_cores: float | None  # average cores busy with other processes (and hypervisor steal); None: unknown
    busy: list[dict] = field(default_factory=list)  # the busiest others: {"pid", "name", "cores"}

    @property
    def contended(self) -> bool:
        """Others used at least CONTENDED_CORES on average (unknown counts as contended: not proven quiet)."""
        return self.others_cores is None or self.others_cores >= CONTENDED_CORES

    def describe(self) -> str:
        """'quiet (others 0.02 cores)' or 'contended: others 1.10 cores (python 0.98, ...)'."""
        if self.others_cores is None:
            return "load unknown (no /proc)"
        names = ", ".join(f"{b['name']} {b['cores']:.2f}" for b in self.busy[:3])
        verdict = "contended" if self.contended else "quiet"
        return f"{verdict} (others {self.others_cores:.2f} cores{': ' + names if names else ''})"

    @classmethod
    def from_dict(cls, data: dict) -> Load:
        """The inverse of to_dict (its `contended` is derived, not stored)."""
        return cls(**{k: v for k, v in data.items() if k != "contended"})

    def to_dict(self) -> dict:
        """JSON-ready (what the peak cache stores): load_avg as a list, the verdict included."""
        d = asdict(self) | {"contended": self.contended}
        d["load_avg"] = list(self.load_avg) if self.load_avg is not None else None
        return d


class LoadWindow:
    """Measure what other processes used between `start()` and `stop()`.

    Usage: `w = LoadWindow().start(); <measure>; load = w.stop()`. The measuring work must run
    in this process or in children it waits for (subprocess.run): their time is ours.
    """

    def start(self) -> LoadWindow:
        try:
            self._load_avg = os.getloadavg()
        except OSError:
            self._load_avg = None
        self._t, self._own, self._busy = time.perf_counter(), _own_s(), _machine_busy_s()
        self._procs = _process_times()
        return self

    def stop(self, top: int = 5) -> Load:
        seconds = max(time.perf_counter() - self._t, 1e-9)
        busy, own = _machine_busy_s(), _own_s() - self._own
        if busy is None or self._busy is None:
            return Load(seconds, self._load_avg, None)
        others = max(0.0, (busy - self._busy - own) / seconds)
        me = os.getpid()
        procs = []
        for pid, (name, used) in _process_times().items():
            if pid != me and pid in self._procs:
                cores = (used - self._procs[pid][1]) / seconds
                if cores >= 0.05:
                    procs.append({"pid": pid, "name": name, "cores": round(cores, 3)})
        procs.sort(key=lambda p: -p["cores"])
        return Load(seconds, self._load_avg, round(others, 3), procs[:top])
