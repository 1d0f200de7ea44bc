"""The records a sweep writes and reads back: one planned run (a plan.json entry), one failed
run (failed.json), and one finished run as the fits read it (result.json, a line of results.jsonl).

A sweep's record (scaling.results.collect_result) fills every field. A CSV row
(scaling.results.read_csv) holds only what a fit needs: its id, budget, N, tokens, compute and
loss; the sweep's other fields stay None there. The JSON form is the dataclass's fields in
order, so a record reads back from any result.json a sweep wrote.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

# How a run's training compute is counted (scaling.results' docstring); a CSV's given compute is "given".
Definition = Literal["measured", "exact", "6N·D", "6N_total·D", "6N_per_token·D", "given"]
# How its parameters are counted (scaling.results.param_counts); a CSV's given N is "given".
Convention = Literal["total", "non_embedding", "per_token", "embedding", "given"]


@dataclass
class PlannedRun:
    """One run of the plan (scaling.plan.plan_sweep): its size, budget, length and config."""

    id: str  # "C1e12-d4" (+ "-lr2" for an LR-check run)
    budget: float  # FLOPs
    depth: int
    lr_multiplier: float  # 1 for the runs the laws are fitted on
    steps: int
    law_steps: int  # what 6ND would have planned
    warmup_steps: int
    lr: float
    flops: float  # measured FLOPs per step x steps
    hash: str  # of the run's training config: a changed rule makes a new run
    train: dict  # the TrainConfig of the run (run_dir relative to the sweep directory)

    @property
    def dir(self) -> str:
        return f"runs/{self.id}-{self.hash}"

    def to_json(self) -> dict:
        return asdict(self) | {"dir": self.dir}

    @classmethod
    def from_json(cls, data: dict) -> PlannedRun:
        """A plan.json entry (its "dir" is derived from id and hash, so it is not read)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def read_planned_runs(sweep_dir: Path) -> list[PlannedRun]:
    """The runs of the sweep directory's plan.json, in plan order; ValueError where there is none."""
    path = Path(sweep_dir) / "plan.json"
    if not path.is_file():
        raise ValueError(f"{sweep_dir} holds no plan.json: not a sweep directory")
    return [PlannedRun.from_json(r) for r in json.loads(path.read_text())["runs"]]


@dataclass
class Failure:
    """A run's failed.json: how its training ended and the last lines it printed."""

    returncode: int
    tail: str
    time: float  # when the failure was recorded (Unix seconds)

    @classmethod
    def read(cls, run_dir: Path) -> Failure:
        data = json.loads((Path(run_dir) / "failed.json").read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(kw_only=True)
class RunRecord:
    """One finished run: its size, budget, compute under every definition and held-out loss."""

    id: str  # "C1e12-d4" (a sweep's), "row7" (a CSV's line)
    hash: str | None = None  # of the run's training config
    dir: str | None = None  # the run's directory, relative to the sweep's
    budget: float | None  # its isoFLOP group's compute (None until a CSV's runs are grouped)
    depth: int | None = None
    width: int | None = None
    heads: int | None = None
    lr: float | None = None
    lr_multiplier: float = 1.0  # 1 for the runs the laws are fitted on
    warmup_steps: int | None = None
    steps: int | None = None
    law_steps: int | None = None  # what 6ND would have planned
    params: dict[str, int] | None = None  # by part (profiling.parts)
    n: dict[Convention, float]
    tokens: float
    samples: int | None = None
    epochs: float | None = None  # of the generated clips (None for other data)
    scan_epochs: float | None = None  # of the digit scans or Fashion-MNIST images the clips draw on
    flops: dict[Definition, float]
    measured_by_part: dict[str, int] | None = None
    budget_error: float | None = None  # measured compute against the budget, minus 1
    loss: float  # held-out validation loss
    loss_se: float | None = None  # its standard error
    val_clips: int | None = None
    train_loss: float | None = None  # the last logged training loss
    wall_s: float | None = None
    mfu: float | None = None
    config_hash: str | None = None

    @property
    def law_n(self) -> float:
        """N as the laws count it: non-embedding parameters (a CSV's given N)."""
        return self.n.get("non_embedding", next(iter(self.n.values())))

    def n_eff(self, definition: Definition) -> float:
        """N under `definition`: C / (6 D), so that C = 6 N D holds."""
        return self.flops[definition] / (6 * self.tokens)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: object) -> RunRecord:
        """The record back from `to_json()`'s mapping; ValueError naming `source` (its file) when
        a field is missing or unknown."""
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{source}: not a run record ({err})") from None
