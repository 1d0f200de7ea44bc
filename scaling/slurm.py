"""`ministack scaling sweep SWEEP.yaml --executor slurm`: the unfinished runs as one SLURM job array.

Submission is submitit's (the library most ML code submits with): one array task per unfinished
run, at most `array_parallelism` at once, each task calling `scaling.runs.run_one` on its run, so
a run on SLURM is exactly a local run (`python -m train`, or the sweep's launcher) writing into
the same sweep directory; `ministack scaling status` reads where each stands from the files.
Resubmitting skips finished runs.

Time limits and preemption: submitit asks SLURM for SIGUSR2 `signal_delay_s` before the task's
limit and calls `RunTask.checkpoint`, which touches the run's RUN_DIR/slurm/stop (train/preempt.py:
the training saves a checkpoint at its next step and exits), waits for it, and hands the task
back to submitit to requeue; the requeued task resumes the run from that checkpoint. SLURM sends
that signal to every process of the step: the training process is started with SIGUSR2 ignored
(scaling.runs.run_one), so the file, not the signal, stops it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scaling.config import SlurmExecutorConfig
from scaling.plan import Plan
from scaling.record import PlannedRun
from scaling.runs import run_one, state
from train.slurm import explain_sbatch_error

STOP_WAIT_S = 60  # how long a signalled task waits for its run's checkpoint before it is requeued anyway


class RunTask:
    """One run of the sweep as a submitit callable (checkpointable: requeued on its time limit)."""

    def __init__(self, plan: Plan, sweep_dir: Path, run: PlannedRun) -> None:
        self.plan, self.sweep_dir, self.run = plan, Path(sweep_dir).resolve(), run

    def __call__(self) -> str:
        """Train the run (resuming it); raise with the log tail if it failed, so SLURM and
        submitit both see the task fail."""
        result = run_one(self.plan, self.sweep_dir, self.run)
        if result is None:
            raise RuntimeError(f"{self.run.id} failed: see {self.sweep_dir / self.run.dir / 'failed.json'}")
        return self.run.id

    def checkpoint(self, *args, **kwargs):
        """SLURM's pre-timeout signal: ask the training to checkpoint and stop, wait for it, requeue."""
        import submitit

        stop_dir = self.sweep_dir / self.run.dir / "slurm"
        stop_dir.mkdir(parents=True, exist_ok=True)
        (stop_dir / "stop").touch()
        deadline = time.time() + STOP_WAIT_S
        while not (stop_dir / "preempted").exists() and time.time() < deadline:
            time.sleep(0.5)
        return submitit.helpers.DelayedSubmission(RunTask(self.plan, self.sweep_dir, self.run))


def private_folder(path: Path) -> Path:
    """`path`, created and made 0700. submitit's job files there are pickles (the task to run, its
    result) that each task unpickles: whoever can write into the folder can run code as the job's
    user, so no one else may enter it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def submit_sweep(plan: Plan, sweep_dir: Path, cfg: SlurmExecutorConfig, echo=print) -> list[str]:
    """Submit every unfinished run of `plan` as one job array; the task ids ("JOB_I").
    Raises RuntimeError when sbatch is missing or refuses the array."""
    import shutil

    import submitit

    from scaling.runs import write_plan

    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: --executor slurm runs on a SLURM login node")
    sweep_dir = Path(sweep_dir)
    write_plan(plan, sweep_dir)
    todo = [r for r in plan.runs if state(sweep_dir, r) != "finished"]
    if not todo:
        echo(f"sweep {sweep_dir}: all {len(plan.runs)} runs finished; nothing to submit")
        return []
    executor = submitit.AutoExecutor(folder=private_folder(sweep_dir / "slurm") / "%j", cluster="slurm")
    options = {"slurm_partition": cfg.partition, "slurm_account": cfg.account, "mem_gb": cfg.mem_gb}
    executor.update_parameters(
        name=f"sweep-{plan.sweep.name}",
        timeout_min=cfg.time_min,
        gpus_per_node=cfg.gpus_per_node,
        cpus_per_task=cfg.cpus_per_task,
        slurm_array_parallelism=cfg.array_parallelism,
        slurm_signal_delay_s=cfg.signal_delay_s,
        slurm_setup=list(cfg.setup),
        slurm_additional_parameters=dict(cfg.sbatch),
        **{k: v for k, v in options.items() if v is not None},
    )
    try:
        jobs = executor.submit_array([RunTask(plan, sweep_dir, r) for r in todo])
    except Exception as err:  # submitit raises its own error types for sbatch failures
        raise RuntimeError(f"sbatch refused the job array: {explain_sbatch_error(str(err))}") from err
    ids = [job.job_id for job in jobs]
    tasks = sweep_dir / "slurm" / "tasks.json"
    known = json.loads(tasks.read_text()) if tasks.is_file() else {}
    tasks.write_text(json.dumps(known | {run.id: job for run, job in zip(todo, ids)}, indent=1))
    echo(
        f"sweep {sweep_dir}: submitted {len(todo)} run(s) as SLURM job array {ids[0].split('_')[0]} "
        f"(at most {cfg.array_parallelism} at once); `ministack scaling status {sweep_dir}` shows each run"
    )
    for run, job in zip(todo, ids):
        echo(f"  {job}: {run.id}")
    return ids


def task_states(sweep_dir: Path) -> dict[str, tuple[str, str | None]]:
    """Run id -> (its latest SLURM task id, the task's state from squeue, None once it left
    the queue), for a sweep submitted with --executor slurm; {} otherwise or without squeue."""
    import shutil
    import subprocess

    tasks = Path(sweep_dir) / "slurm" / "tasks.json"
    if not tasks.is_file():
        return {}
    ids = json.loads(tasks.read_text())
    states: dict[str, str] = {}
    if shutil.which("squeue"):
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted({t.split("_")[0] for t in ids.values()}))],
            capture_output=True,
            text=True,
        ).stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return {run: (task, states.get(task)) for run, task in ids.items()}
