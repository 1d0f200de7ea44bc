"""The compute ledger: append-only JSONL, one record per training step or served request.

Each record carries the measured FLOPs (by part), the law's FLOPs (6ND or 2NT), their ratio,
tokens, wall time, achieved FLOP/s, MFU, device, dtype and shape, plus the parameter split
the law was computed from, so a report can attribute the gap without the model at hand.

Appends are safe from several processes (data-parallel ranks, server workers): each record
is one `write()` of one line on an O_APPEND descriptor under an exclusive `flock`. A reader
skips lines it cannot parse (a process killed mid-write) and counts them.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from profiling.hardware import DevicePeak, mfu
from profiling.laws import law_flops
from profiling.measure import FlopCount
from profiling.parts import law_params


@dataclass
class Record:
    kind: str  # "train" (one optimizer step) or "infer" (one served request)
    measured_flops: int
    law_flops: float
    tokens: int
    wall_s: float
    device: str
    dtype: str
    shape: str
    parts: dict[str, int]  # measured FLOPs by part
    params: dict[str, int]  # parameters by part; the law's N is profiling.parts.law_params(params)
    peak_flops: float = 0.0  # the peak MFU was computed against (FLOP/s); 0 when unknown
    peak_source: str = ""  # where that peak came from (data sheet, a CPU probe and its load, a raise)
    run: str = ""
    step: int | None = None
    request_id: str | None = None
    rank: int | None = None  # training: the data-parallel rank; each rank records its own share of a step
    world_size: int | None = None  # training: ranks sharing the step (a step's totals sum over them)
    attempt: int | None = None  # training: which start of the run wrote it (train.runlog)
    # bytes moved to and from memory by part, modelled from what ran (serving: weights, kv_read,
    # kv_write; serve.engine.traffic); empty where not recorded
    bytes_parts: dict[str, int] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    @property
    def ratio(self) -> float:
        return self.measured_flops / self.law_flops if self.law_flops else float("nan")

    @property
    def flops_per_s(self) -> float:
        return self.measured_flops / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def bytes_moved(self) -> int:
        return sum(self.bytes_parts.values())

    @property
    def mfu(self) -> float:
        return mfu(self.measured_flops, self.wall_s, self.peak_flops)

    def to_json(self) -> str:
        data = asdict(self) | {
            "ratio": self.ratio,
            "flops_per_s": self.flops_per_s,
            "mfu": self.mfu,
            "bytes_moved": self.bytes_moved,
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


def make_record(
    kind: str,
    count: FlopCount,
    params: dict[str, int],
    tokens: int,
    wall_s: float,
    peak: DevicePeak,
    shape: str,
    bytes_parts: dict[str, int] | None = None,
    **ids,
) -> Record:
    """A record whose law FLOPs use N = trained non-embedding parameters (profiling.parts).

    The record's achieved FLOP/s is first shown to `peak` (DevicePeak.observe): a peak below it
    is stale and is raised, so no record carries an MFU above 100%. The record keeps the peak
    and its source, so a corrected peak can re-derive MFU later (`flops report --peak-flops`).
    """
    what = f"{kind} step {ids['step']}" if ids.get("step") is not None else f"{kind} {ids.get('request_id') or shape}"
    if wall_s > 0:
        peak.observe(count.total / wall_s, by=what)
    return Record(
        kind=kind,
        measured_flops=count.total,
        law_flops=law_flops(kind, law_params(params), tokens),
        tokens=tokens,
        wall_s=wall_s,
        device=peak.device,
        dtype=peak.dtype,
        shape=shape,
        parts=dict(count.by_part),
        params=dict(params),
        peak_flops=peak.flops,
        peak_source=peak.source,
        bytes_parts=dict(bytes_parts or {}),
        **ids,
    )


class Ledger:
    """Appends records to a JSONL file; safe across processes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Record) -> None:
        line = (record.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)  # closing releases the lock


@dataclass
class LedgerData:
    records: list[Record]
    skipped: int  # lines that were not a valid record (e.g. cut by a crash mid-write)


def read_ledgers(paths: Iterable[str | os.PathLike]) -> LedgerData:
    """All valid records of the given ledgers, in file order, and how many lines were skipped."""
    records, skipped = [], 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(Record.from_dict(json.loads(line)))
                except (ValueError, TypeError):
                    skipped += 1
    return LedgerData(records, skipped)


def supersede_lines(path: str | os.PathLike, superseded, aside: str | os.PathLike | None = None) -> int:
    """Move the JSON lines of `path` for which `superseded(obj)` is true to `aside` (default: the
    `.superseded.jsonl` sibling, appended), keeping the others in order; returns how many moved.

    For records a restart redoes (train.runlog). The aside copy is written and synced before the
    file is replaced (atomically, under the append lock): a crash in between can leave a line in
    both files, never in neither. Lines that do not parse stay where they are.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    aside = Path(aside) if aside is not None else path.with_suffix(".superseded.jsonl")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        keep, moved = [], []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                gone = bool(line.strip()) and superseded(json.loads(line))
            except (ValueError, TypeError, AttributeError):
                gone = False
            (moved if gone else keep).append(line if line.endswith("\n") else line + "\n")
        if moved:
            with open(aside, "a", encoding="utf-8") as f:
                f.writelines(moved)
                f.flush()
                os.fsync(f.fileno())
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, path)
    finally:
        os.close(fd)
    return len(moved)
