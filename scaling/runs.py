"""Running a planned sweep, one `ministack train` per run, and knowing where each run stands.

    SWEEP_DIR/plan.json                   the plan (sizes, runs, their configs)
    SWEEP_DIR/results.jsonl               one record per finished run (scaling.results), rewritten whole
    SWEEP_DIR/runs/ID-HASH/train.yaml     the run's training config; model.yaml its DiT
    SWEEP_DIR/runs/ID-HASH/train.log      its stdout and stderr
    SWEEP_DIR/runs/ID-HASH/result.json    written once the run finished and was checked
    SWEEP_DIR/runs/ID-HASH/failed.json    its exit status and log tail, when it failed

Every run goes through the training entry point (`python -m train RUN/train.yaml`, or the
sweep's `launcher`, e.g. `accelerate launch ... -m train`), so it writes its usual ledger, log
and checkpoints. A run with a result.json is skipped; a killed run restarts from its last
checkpoint (the training loop resumes by itself); a failed run is reported and the sweep goes
on with the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, get_args

import yaml

from scaling.plan import Plan
from scaling.record import Failure, PlannedRun, RunRecord
from scaling.results import RESULTS, collect_result, write_results

RunState = Literal["finished", "failed", "started", "pending"]


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def command(plan: Plan, config: Path) -> list[str]:
    """The command that trains one run: the sweep's launcher (or this Python) + `-m train CONFIG`."""
    launcher = shlex.split(plan.sweep.launcher) if plan.sweep.launcher else [sys.executable]
    return [*launcher, "-m", "train", str(config)]


def prepare_run(sweep_dir: Path, run: PlannedRun) -> Path:
    """Write the run's model.yaml and train.yaml (absolute paths) and return train.yaml's path."""
    run_dir = (sweep_dir / run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    train = dict(run.train, run_dir=str(run_dir), model=str(run_dir / "model.yaml"))
    (run_dir / "model.yaml").write_text(yaml.safe_dump({"model": run.train["model"]}, sort_keys=False))
    (run_dir / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))
    return run_dir / "train.yaml"


def state(sweep_dir: Path, run: PlannedRun) -> RunState:
    """ "finished", "failed", "started" (a directory with a log but no result) or "pending"."""
    run_dir = sweep_dir / run.dir
    if (run_dir / "result.json").is_file():
        return "finished"
    if (run_dir / "failed.json").is_file():
        return "failed"
    return "started" if (run_dir / "train.log").is_file() else "pending"


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _ignore_usr2() -> None:
    """In the training process, before exec: ignore SIGUSR2 (inherited by the launcher and its
    workers). SLURM sends submitit's pre-timeout SIGUSR2 to every process of the task's step;
    left at its default it would kill the training before it checkpoints. The stop reaches the
    training as RUN_DIR/slurm/stop instead (scaling/slurm.py: RunTask.checkpoint)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def run_one(plan: Plan, sweep_dir: Path, run: PlannedRun, echo=print) -> RunRecord | None:
    """Train one run to its end (resuming it if it had started), check it and write its
    result.json; None and a failed.json (exit status, log tail) if training failed; None alone
    if it stopped on request (RUN_DIR/slurm/stop: a SLURM time limit) after a checkpoint."""
    config = prepare_run(sweep_dir, run)
    run_dir = config.parent
    (run_dir / "failed.json").unlink(missing_ok=True)
    start = time.time()
    with (run_dir / "train.log").open("a") as log:
        log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command(plan, config))}\n")
        log.flush()
        code = subprocess.call(command(plan, config), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_ignore_usr2)
    if code == 0 and (run_dir / "slurm" / "preempted").is_file():  # checkpointed on request: to be resumed
        echo(
            f"  {run.id}: stopped on request after {time.time() - start:.0f} s, checkpointed; it resumes when run again"
        )
        return None
    if code != 0:
        tail = log_tail(run_dir / "train.log")
        _atomic_json(run_dir / "failed.json", asdict(Failure(returncode=code, tail=tail, time=time.time())))
        echo(
            f"  {run.id}: FAILED (exit {code}) after {time.time() - start:.0f} s; log {run_dir / 'train.log'}:\n"
            + "\n".join("    " + line for line in tail.splitlines())
        )
        return None
    result = collect_result(plan, run, run_dir)
    _atomic_json(run_dir / "result.json", result.to_json())
    echo(
        f"  {run.id}: loss {result.loss:.4f} ± {result.loss_se:.4f}, measured C {result.flops['measured']:.3e} "
        f"({result.budget_error:+.2%} of budget), {result.wall_s:.0f} s"
    )
    return result


def write_plan(plan: Plan, sweep_dir: Path) -> None:
    """SWEEP_DIR/plan.json (atomically): what `status`, `fit` and the report read the plan from."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(sweep_dir / "plan.json", plan.to_dict())


def run_sweep(plan: Plan, sweep_dir: Path, echo=print) -> dict[RunState, int]:
    """Every unfinished run of `plan` in turn (local executor), then results.jsonl. Returns the
    count of runs by final state."""
    write_plan(plan, sweep_dir)
    todo = [r for r in plan.runs if state(sweep_dir, r) != "finished"]
    echo(f"sweep {sweep_dir}: {len(plan.runs) - len(todo)} of {len(plan.runs)} runs finished, {len(todo)} to run")
    for i, run in enumerate(todo, 1):
        echo(f"[{i}/{len(todo)}] {run.id}: depth {run.depth}, {run.steps} steps, lr {run.lr:.3g}")
        run_one(plan, sweep_dir, run, echo)
    results = write_results(plan, sweep_dir)
    counts: dict[RunState, int] = {s: 0 for s in get_args(RunState)}
    for run in plan.runs:
        counts[state(sweep_dir, run)] += 1
    echo(
        f"sweep {sweep_dir}: {counts['finished']} finished, {counts['failed']} failed; {len(results)} results in "
        f"{sweep_dir / RESULTS}"
    )
    return counts
