"""`ministack train RUN.yaml --slurm`: the run as a SLURM batch job, one accelerate (or torchrun) node per task.

Plain sbatch, not a submission library: a multi-node accelerate launch is one `srun` of one
shell line per node, which a batch script says more plainly than any wrapper, and the script
is written next to the run (RUN_DIR/slurm/train.sbatch) so it can be edited and `sbatch`ed by hand.

The script:
- asks for `nodes` nodes and `ntasks` tasks (default one per node), GPUs, CPUs, memory, a time
  limit, partition, account and any extra `#SBATCH` lines; logs to RUN_DIR/slurm/%j.out;
- starts one `accelerate launch` (or `torchrun`, `launcher`) per task through `srun`: machine
  rank SLURM_PROCID of SLURM_NTASKS machines, `processes_per_node` processes each, rendezvous on the job's first host
  at a port derived from the job id (two jobs on one host do not collide);
- with `signal_s`, has SLURM send SIGUSR1 to the batch shell that long before the time limit;
  the shell touches RUN_DIR/slurm/stop (train/preempt.py: every rank sees it at the same step,
  saves a checkpoint and exits 0, leaving RUN_DIR/slurm/preempted; a signal forwarded through
  srun would kill `accelerate launch` instead), and then requeues the job (`requeue`); the
  requeued job resumes from the checkpoint like any restarted run (train/checkpoint.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from train.config import SlurmConfig

LAUNCHERS = ("accelerate", "torchrun")
DEFAULT_ACCELERATE_CONFIG = "configs/accelerate/ddp.yaml"
TIME = re.compile(r"^(\d+-)?\d+(:\d\d){0,2}$")  # SLURM's D-HH:MM:SS, HH:MM:SS, MM:SS or minutes


def _lines(value) -> list[str]:
    """A YAML list of lines, or one line given as a plain string."""
    return [value] if isinstance(value, str) else [str(x) for x in value]


def check(cfg: SlurmConfig) -> None:
    """Refuse settings SLURM would reject later, or that would misplace processes, naming the field."""
    if cfg.nodes < 1:
        raise ValueError(f"slurm.nodes must be >= 1, got {cfg.nodes}")
    if cfg.ntasks is not None and cfg.ntasks < cfg.nodes:
        raise ValueError(
            f"slurm.ntasks ({cfg.ntasks}) must be at least slurm.nodes ({cfg.nodes}): one accelerate node per task"
        )
    if cfg.ntasks is not None and cfg.ntasks % cfg.nodes:
        raise ValueError(
            f"slurm.ntasks ({cfg.ntasks}) must be a multiple of slurm.nodes ({cfg.nodes}): the same tasks on every node"
        )
    if cfg.gpus_per_node and cfg.ntasks not in (None, cfg.nodes):
        raise ValueError(
            f"with GPUs one task per node runs every GPU of it: leave slurm.ntasks unset (got {cfg.ntasks})"
        )
    if cfg.cpus_per_task is not None and cfg.cpus_per_task < 1:
        raise ValueError(f"slurm.cpus_per_task must be >= 1, got {cfg.cpus_per_task}")
    if cfg.launcher not in LAUNCHERS:
        raise ValueError(f"slurm.launcher must be one of {', '.join(LAUNCHERS)}, got {cfg.launcher!r}")
    if cfg.launcher == "torchrun" and cfg.accelerate_config is not None:
        raise ValueError(
            "slurm.accelerate_config is read by `accelerate launch` only: with slurm.launcher torchrun "
            "set the run's `deepspeed:` (a DeepSpeed JSON) for ZeRO, or leave it out for DDP"
        )
    if cfg.launcher == "accelerate" and not Path(accelerate_config(cfg)).is_file():
        raise ValueError(f"slurm.accelerate_config {cfg.accelerate_config!r} is not a file")
    if cfg.gpus_per_node < 0 or (cfg.processes_per_node is not None and cfg.processes_per_node < 1):
        raise ValueError("slurm.gpus_per_node must be >= 0 and slurm.processes_per_node >= 1")
    if not TIME.match(str(cfg.time)):
        raise ValueError(f"slurm.time {cfg.time!r} is not a SLURM time (D-HH:MM:SS, HH:MM:SS, MM:SS or minutes)")
    if cfg.signal_s < 0:
        raise ValueError(f"slurm.signal_s must be >= 0, got {cfg.signal_s}")
    for line in _lines(cfg.sbatch):
        if not line.startswith("--"):
            raise ValueError(f"slurm.sbatch entries are sbatch options like '--constraint=h100', got {line!r}")


def accelerate_config(cfg: SlurmConfig) -> str:
    return cfg.accelerate_config or DEFAULT_ACCELERATE_CONFIG


def launch_line(cfg: SlurmConfig, per_node: int, config_path: Path, overrides: list[str], python: str) -> str:
    """The shell line every task runs: one node of `SLURM_NTASKS`, rank `SLURM_PROCID`, `per_node`
    training processes, rendezvous at $MASTER_ADDR:$MASTER_PORT."""
    train = [f"-m train {shlex.quote(str(config_path))}", *(f"--set {shlex.quote(o)}" for o in overrides)]
    if cfg.launcher == "torchrun":  # with no CUDA, accelerate's Accelerator falls back to CPU by itself
        return " ".join(
            [
                f"{shlex.quote(python)} -m torch.distributed.run",
                "--nnodes $SLURM_NTASKS --node_rank $SLURM_PROCID",
                f"--nproc_per_node {per_node} --master_addr $MASTER_ADDR --master_port $MASTER_PORT",
                *train,
            ]
        )
    # CPU nodes: DDP needs accelerate told so, while DeepSpeed runs on CPU by itself and is
    # silently replaced by plain CPU DDP when told
    deepspeed = yaml.safe_load(Path(accelerate_config(cfg)).read_text()).get("distributed_type") == "DEEPSPEED"
    cpu = "" if cfg.gpus_per_node or deepspeed else "ACCELERATE_USE_CPU=1 "
    return cpu + " ".join(
        [
            f"{shlex.quote(python)} -m accelerate.commands.launch",
            f"--config_file {shlex.quote(str(Path(accelerate_config(cfg)).resolve()))}",
            "--num_machines $SLURM_NTASKS --machine_rank $SLURM_PROCID",
            "--main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT",
            # DeepSpeed configs: every node starts its own processes (the default, pdsh, would
            # ssh into the others from the first); ignored for DDP
            "--deepspeed_multinode_launcher standard",
            f"--num_processes $(( SLURM_NTASKS * {per_node} ))",
            *train,
        ]
    )


def batch_script(cfg: SlurmConfig, run_dir: Path, config_path: Path, overrides: list[str], python: str) -> str:
    """The batch script for the run whose config is `config_path` (absolute paths throughout)."""
    check(cfg)
    tasks = cfg.ntasks or cfg.nodes
    per_node = cfg.processes_per_node or max(cfg.gpus_per_node, 1)
    logs = run_dir / "slurm"
    stop, marker = shlex.quote(str(logs / "stop")), shlex.quote(str(logs / "preempted"))
    options = [
        f"--job-name={cfg.job_name or run_dir.name}",
        f"--nodes={cfg.nodes}",
        f"--ntasks={tasks}",
        f"--ntasks-per-node={tasks // cfg.nodes}",
        f"--output={logs}/%j.out",
        "--open-mode=append",
        f"--time={cfg.time}",
    ]
    options += [f"--gpus-per-node={cfg.gpus_per_node}"] if cfg.gpus_per_node else []
    options += [f"--cpus-per-task={cfg.cpus_per_task}"] if cfg.cpus_per_task else []
    options += [f"--mem={cfg.mem}"] if cfg.mem else []
    options += [f"--partition={cfg.partition}"] if cfg.partition else []
    options += [f"--account={cfg.account}"] if cfg.account else []
    options += [f"--signal=B:USR1@{cfg.signal_s}"] if cfg.signal_s else []
    options += ["--requeue"] if cfg.requeue else []
    options += _lines(cfg.sbatch)
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {o}" for o in options),
        "",
        f"# written by `ministack train --slurm` for {run_dir}; edit and `sbatch` it by hand if you like",
        "set -u",
        *_lines(cfg.setup),
        # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05): without this every rank
        # and its data workers would share one core
        *(["export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK"] if cfg.cpus_per_task else []),
        f"cd {shlex.quote(str(Path.cwd()))}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        f'echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}): $SLURM_NTASKS {cfg.launcher} node(s) x {per_node} on $SLURM_JOB_NODELIST"',
        f"rm -f {stop} {marker}",
        f"trap 'touch {stop}' USR1  # training checkpoints at its next step and stops (train/preempt.py)",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(launch_line(cfg, per_node, config_path, overrides, python))} &",
        "step=$!",
        "while true; do wait $step; rc=$?; kill -0 $step 2>/dev/null || break; done  # a trap ends `wait` early",
        f"if [ -f {marker} ]; then",
        f'  echo "checkpointed at step $(cat {marker}) before the time limit: requeueing"',
        "  scontrol requeue $SLURM_JOB_ID",
        "  exit 0",
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def explain_sbatch_error(message: str) -> str:
    """sbatch's message, with the likely cause when it could not reach the controller."""
    if "Unable to contact slurm controller" in message or "Invalid user for SlurmUser" in message:
        conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
        return f"{message} (is slurmctld running, and is {conf} (SLURM_CONF) its slurm.conf?)"
    return message


def submit(
    cfg: SlurmConfig, run_dir: Path, config_path: Path, overrides: list[str], python: str, dry_run: bool = False
) -> tuple[Path, str | None]:
    """Write RUN_DIR/slurm/train.sbatch and (unless `dry_run`) submit it; (script, job id or None).
    Raises RuntimeError when sbatch is missing or refuses the job, with its message."""
    script = run_dir / "slurm" / "train.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(batch_script(cfg, run_dir, config_path, overrides, python))
    if dry_run:
        return script, None
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: run on a SLURM login node, or use --dry-run to get the script")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"sbatch refused {script}: {explain_sbatch_error(done.stderr.strip() or done.stdout.strip())}"
        )
    return script, done.stdout.strip().split(";")[0]
