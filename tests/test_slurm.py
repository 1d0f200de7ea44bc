"""Training on SLURM: the batch script, the stop-and-requeue path, and jobs on a real one-host
cluster (tests/slurm_cluster.py): a "2-node" job (two tasks, each an accelerate node) matches the
single-process run, and a job signalled before its time limit checkpoints, requeues and ends
with the losses and final weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import wait_for_job
from test_train import EXTENSIONS, FOUR_FP32_STEPS, ROOT, SMALL, _env, _logged_steps, _losses, _model_yaml, _train

from train.config import SlurmConfig
from train.slurm import batch_script, check


def test_batch_script_asks_for_what_the_config_says(tmp_path):
    cfg = SlurmConfig(
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=32,
        mem="200G",
        time="2-00:00:00",
        partition="h100",
        account="lab",
        signal_s=300,
        setup=["source /opt/venv/bin/activate"],
        sbatch=["--exclusive"],
    )
    script = batch_script(cfg, tmp_path / "run", tmp_path / "run.yaml", ["max_steps=10"], "/opt/venv/bin/python")
    for line in (
        "--nodes=2",
        "--ntasks=2",
        "--gpus-per-node=8",
        "--cpus-per-task=32",
        "--mem=200G",
        "--time=2-00:00:00",
        "--partition=h100",
        "--account=lab",
        "--signal=B:USR1@300",
        "--requeue",
        "--exclusive",
        f"--output={tmp_path}/run/slurm/%j.out",
    ):
        assert f"#SBATCH {line}\n" in script
    assert "source /opt/venv/bin/activate" in script and "ACCELERATE_USE_CPU" not in script  # GPUs: no CPU flag
    assert "#SBATCH --ntasks-per-node=1\n" in script and "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in script
    one_line = batch_script(
        SlurmConfig(setup="module load cuda", sbatch="--exclusive"), tmp_path / "run", tmp_path / "r.yaml", [], "python"
    )
    assert "\nmodule load cuda\n" in one_line and "#SBATCH --exclusive\n" in one_line  # a string is one line
    assert "--num_machines $SLURM_NTASKS --machine_rank $SLURM_PROCID" in script
    assert "--num_processes $(( SLURM_NTASKS * 8 ))" in script and "--set max_steps=10" in script
    assert f"trap 'touch {tmp_path}/run/slurm/stop' USR1" in script and "scontrol requeue $SLURM_JOB_ID" in script
    cpu = batch_script(
        SlurmConfig(ntasks=2, signal_s=0, requeue=False), tmp_path / "run", tmp_path / "r.yaml", [], "python"
    )
    assert "ACCELERATE_USE_CPU=1" in cpu and "--signal" not in cpu and "--requeue" not in cpu
    torchrun = batch_script(
        SlurmConfig(nodes=4, gpus_per_node=8, launcher="torchrun"), tmp_path / "run", tmp_path / "r.yaml", [], "python"
    )
    assert (
        "python -m torch.distributed.run --nnodes $SLURM_NTASKS --node_rank $SLURM_PROCID --nproc_per_node 8 "
        "--master_addr $MASTER_ADDR --master_port $MASTER_PORT -m train"
    ) in torchrun and "accelerate" not in torchrun


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"ntasks": 1, "nodes": 2}, "slurm.ntasks"),
        ({"time": "forever"}, "slurm.time"),
        ({"sbatch": ["exclusive"]}, "slurm.sbatch"),
        ({"nodes": 0}, "slurm.nodes"),
        ({"signal_s": -1}, "slurm.signal_s"),
        ({"sbatch": "exclusive"}, "slurm.sbatch"),
        ({"nodes": 2, "ntasks": 3}, "multiple of slurm.nodes"),
        ({"gpus_per_node": 8, "ntasks": 2}, "one task per node"),
        ({"cpus_per_task": 0}, "slurm.cpus_per_task"),
        ({"accelerate_config": "no/such.yaml"}, "slurm.accelerate_config"),
        ({"launcher": "mpirun"}, "slurm.launcher"),
        ({"launcher": "torchrun", "accelerate_config": "configs/accelerate/zero2.yaml"}, "run's `deepspeed:`"),
    ],
)
def test_bad_slurm_settings_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        check(SlurmConfig(**bad))


def test_cli_dry_run_writes_the_script_next_to_the_run(tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "train",
        "configs/train/tiny.yaml",
        "--slurm",
        "--dry-run",
        "--set",
        f"run_dir={run}",
        "--set",
        "slurm.time=30",
        "--set",
        "max_steps=7",
    ]
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    script = (run / "slurm" / "train.sbatch").read_text()
    assert proc.stdout.strip() == script.strip() and "#SBATCH --time=30" in script
    assert f"--set run_dir={run} --set max_steps=7" in script and "slurm.time" not in script.split("#SBATCH")[-1]
    for extra, message in (
        (["--dry-run"], "--dry-run goes with --slurm"),
        (["--slurm", "--set", "slurm.time=x"], "slurm.time"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "train", "configs/train/tiny.yaml", *extra],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and message in proc.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[str], Path]:
    """The settings both stop tests train with (30 fp32 steps, no checkpoint on the way: the
    stop's is the only one) and the run directory of those settings trained without a stop,
    which each stopped run must equal. Trained once for both."""
    root = tmp_path_factory.mktemp("uninterrupted")
    settings = [
        "--set",
        f"model={_model_yaml(root)}",
        "--set",
        "max_steps=30",
        "--set",
        "checkpoint_every=100",
        "--set",
        "mixed_precision=no",
    ]
    full = _train(root / "full", *settings)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    return settings, root / "full"


@pytest.mark.slow
def test_a_stop_request_checkpoints_then_the_rerun_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    """What the batch script's USR1 trap does (touch RUN/slurm/stop), without SLURM: the run
    checkpoints at its next step, leaves the requeue marker and exits 0; run again, it resumes
    and every step's loss equals the uninterrupted run's."""
    model, full = uninterrupted
    run = tmp_path / "stopped"
    proc = _train(run, *model)
    deadline = time.time() + 600
    while _logged_steps(run) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    (run / "slurm").mkdir(exist_ok=True)
    (run / "slurm" / "stop").touch()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    stopped_at = json.loads((run / "slurm" / "preempted").read_text())["step"]
    assert 4 <= stopped_at < 30 and f"checkpointed at step {stopped_at}" in out
    assert (run / "checkpoints" / f"step-{stopped_at:07d}" / "meta.json").is_file() and not (run / "pipeline").exists()
    again = _train(run, *model)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resumed from" in out, out
    assert not (run / "slurm" / "preempted").exists()
    assert _losses(run) == _losses(full)
    assert _final_weights(run) == _final_weights(full)


def _submit(run: Path, env: dict, *settings: str) -> str:
    """Submit the defaults test_train's runs use (an empty YAML: the job reads a file) plus `settings`."""
    config = run.parent / f"{run.name}.yaml"
    config.write_text("{}\n")
    args = [
        sys.executable,
        "-m",
        "train",
        str(config),
        "--slurm",
        "--set",
        f"run_dir={run}",
        *SMALL,
        "--set",
        "mixed_precision=no",
        "--set",
        "slurm.time=15",
        *settings,
    ]
    env = _env() | {"SLURM_CONF": env["SLURM_CONF"], "TORCH_EXTENSIONS_DIR": EXTENSIONS}  # sbatch passes it on
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted SLURM job ")[1].split(":")[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch",
    [
        ["--set", "slurm.launcher=accelerate"],  # DDP over gloo
        ["--set", "slurm.launcher=accelerate", "--set", "slurm.accelerate_config=configs/accelerate/zero2.yaml"],
        ["--set", "slurm.launcher=torchrun", "--set", "deepspeed=configs/deepspeed/zero2.json"],
    ],
    ids=["accelerate-ddp", "accelerate-zero2", "torchrun-zero2"],
)
def test_two_node_job_matches_the_single_process_run(slurm, tmp_path, launch, single_process_reference):
    """Two SLURM tasks on this host, each a node (machine rank SLURM_PROCID, gloo) of accelerate
    or torchrun, DDP or DeepSpeed ZeRO-2 from the same config as on one node, batch 2 each,
    against one process on batch 4: the same losses."""
    reference = _losses(single_process_reference)
    run = tmp_path / "two-node"
    job = _submit(
        run, slurm, "--set", f"model={_model_yaml(tmp_path)}", *FOUR_FP32_STEPS, "--set", "slurm.ntasks=2", *launch
    )
    state = wait_for_job(slurm, job)
    log = (run / "slurm" / f"{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"2 {launch[1].split('=')[1]} node(s) x 1" in log and "trained 4 steps" in log
    if "zero2" in " ".join(launch):  # DeepSpeed's partitioned optimizer state, one shard per rank
        assert len(list((run / "checkpoints").glob("step-*/pytorch_model/zero_pp_rank_*_optim_states.pt"))) == 2
    got = _losses(run)
    assert got.keys() == reference.keys()
    assert all(got[s] == pytest.approx(reference[s], rel=1e-4) for s in reference), (got, reference)
    ledger = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["rank"]) for r in ledger) == [(s, r) for s in range(1, 5) for r in (0, 1)]


@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm, tmp_path, uninterrupted):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the run
    checkpoints, the job requeues itself, the requeued job resumes and finishes with every
    step's loss equal to an uninterrupted run's."""
    model, full = uninterrupted
    run = tmp_path / "requeued"
    job = _submit(run, slurm, *model)
    deadline = time.time() + 600
    while _logged_steps(run) < 4:
        assert time.time() < deadline, "the job never got going"
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=slurm)
    state = wait_for_job(slurm, job, timeout=900)
    log = (run / "slurm" / f"{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "requeueing" in log and "(restart 1)" in log and "resumed from" in log
    attempts = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert [a["attempt"] for a in attempts] == [1, 2] and 4 <= attempts[1]["resumed_from"] < 30
    assert _losses(run) == _losses(full)
    assert _final_weights(run) == _final_weights(full)  # bit-identical EMA weights


def _final_weights(run: Path) -> dict[str, bytes]:
    """The saved pipeline's DiT weights, tensor by tensor, as bytes."""
    from safetensors.torch import load_file

    (path,) = (run / "pipeline" / "transformer").glob("*.safetensors")
    return {k: v.numpy().tobytes() for k, v in load_file(path).items()}


@pytest.mark.slow
def test_sweep_as_a_job_array_completes_reports_a_failed_task_and_fits(slurm, tmp_path):
    """A miniature sweep (6 runs, one launcher failing on purpose) as one job array of 2 tasks
    at a time: the others finish, status names the failure with its log tail, fit reads the
    results, and resubmitting submits only the failed run."""
    import yaml
    from test_scaling_sweep import MINI

    launcher = tmp_path / "launch.sh"
    launcher.write_text(
        f'#!/bin/sh\ncase "$*" in *C1e09-d1-*) echo "no GPU for you" >&2; exit 3;; esac\nexec {sys.executable} "$@"\n'
    )
    launcher.chmod(0o755)
    config = tmp_path / "mini.yaml"
    config.write_text(
        yaml.safe_dump(
            MINI
            | {
                "launcher": str(launcher),
                "budgets": [
                    {"flops": 1.0e9, "sizes": [1, 2]},
                    {"flops": 2.0e9, "sizes": [1, 2, 3]},
                    {"flops": 4.0e9, "sizes": [2]},
                ],
                "slurm": {"time_min": 15, "array_parallelism": 2},
            }
        )
    )
    sweep_dir = tmp_path / "sweep"
    env = _env() | {"SLURM_CONF": slurm["SLURM_CONF"]}

    def scaling(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "scaling", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )

    out = scaling("sweep", str(config), "--executor", "slurm", "--out", str(sweep_dir))
    assert out.returncode == 0, out.stderr
    assert "submitted 6 run(s) as SLURM job array" in out.stdout and "at most 2 at once" in out.stdout
    tasks = json.loads((sweep_dir / "slurm" / "tasks.json").read_text())
    assert len(tasks) == 6 and len({t.split("_")[0] for t in tasks.values()}) == 1
    mid = scaling("status", str(sweep_dir))  # 2 at a time: the others wait in the queue
    assert mid.returncode == 0 and "queued" in mid.stdout and "PENDING)" in mid.stdout, mid.stdout + mid.stderr
    for task in tasks.values():
        wait_for_job(slurm, task, timeout=900)
    status = scaling("status", str(sweep_dir))
    assert status.returncode == 0, status.stderr
    assert "5 finished" in status.stdout and "1 failed" in status.stdout
    assert "no GPU for you" in status.stdout and "exit 3" in status.stdout
    fit = scaling(
        "fit", str(sweep_dir), "--bootstrap", "10", "--starts", "10"
    )  # reads the results (the optimum: test_scaling_sweep)
    assert fit.returncode == 0, fit.stderr
    assert (sweep_dir / "fit.json").is_file() and "5 runs over 3 budgets" in fit.stdout
    again = scaling("sweep", str(config), "--executor", "slurm", "--out", str(sweep_dir))
    assert again.returncode == 0 and "submitted 1 run(s)" in again.stdout and "C1e09-d1" in again.stdout, again.stderr


@pytest.mark.slow
def test_sweep_task_signalled_before_its_time_limit_checkpoints_requeues_and_finishes(slurm, tmp_path):
    """SIGUSR2 to the array task's step (what submitit's --signal=USR2@delay sends before the
    limit, to every process of the step, the training included): the run checkpoints, submitit
    requeues the task, the requeued task resumes the run from that step and finishes it."""
    import yaml
    from test_scaling_sweep import MINI

    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump(MINI | {"budgets": [{"flops": 5.0e9, "sizes": [1]}], "slurm": {"time_min": 15}}))
    sweep_dir = tmp_path / "sweep"
    env = _env() | {"SLURM_CONF": slurm["SLURM_CONF"]}
    out = subprocess.run(
        [sys.executable, "-m", "scaling", "sweep", str(config), "--executor", "slurm", "--out", str(sweep_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    (task,) = json.loads((sweep_dir / "slurm" / "tasks.json").read_text()).values()
    deadline = time.time() + 600
    while not any(_logged_steps(run) >= 20 for run in sweep_dir.glob("runs/*")):
        assert time.time() < deadline, "the task never got going"
        time.sleep(0.1)
    (run,) = (sweep_dir / "runs").iterdir()
    subprocess.run(["scancel", "--signal=USR2", task], check=True, env=slurm)
    wait_for_job(slurm, task, timeout=900)
    logs = "".join(p.read_text() for p in (sweep_dir / "slurm").glob("*/*_log.*"))
    assert (run / "result.json").is_file(), logs[-3000:]
    attempts = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    steps = json.loads((run / "result.json").read_text())["steps"]
    assert [a["attempt"] for a in attempts] == [1, 2] and 20 <= attempts[1]["resumed_from"] < steps, attempts
    assert sorted(_losses(run)) == list(range(1, steps + 1))  # every step once, none lost or repeated
    assert "this job is preempted" in logs and "Calling checkpoint method" in logs


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="SLURM's client commands are not installed")
def test_sbatch_without_a_controller_names_the_likely_cause(tmp_path):
    """No slurmctld behind SLURM_CONF: the error says so and names the config file it read."""
    conf = tmp_path / "slurm.conf"  # MessageTimeout: sbatch retries the controller once a second that long (default 10)
    conf.write_text(
        "ClusterName=none\nSlurmctldHost=localhost\nSlurmctldPort=16999\nMessageTimeout=1\n"
        "NodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost Default=YES\n"
    )
    args = [sys.executable, "-m", "train", "configs/train/tiny.yaml", "--slurm", "--set", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        args, cwd=ROOT, env=_env() | {"SLURM_CONF": str(conf)}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Unable to contact slurm controller" in proc.stderr
    assert f"is slurmctld running, and is {conf} (SLURM_CONF) its slurm.conf?" in proc.stderr
