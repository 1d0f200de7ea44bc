"""Training runs as a user launches them: single process, crash + resume, real data with bad files."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.media import write_video
from profiling.ledger import read_ledgers

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--set",
    "data.size=48",
    "--set",
    "data.batch_size=2",
    "--set",
    "data.buckets=[[1,16,16],[3,16,16]]",
    "--set",
    "warmup_steps=2",
    "--set",
    "lr=1e-3",
]
# The 2-rank runs and their single-process reference (conftest.py's single_process_reference):
# equal to 1e-4 needs fp32 ("auto": bf16 where fast)
FOUR_FP32_STEPS = ["--set", "max_steps=4", "--set", "mixed_precision=no"]


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _model_yaml(tmp_path: Path) -> str:
    path = tmp_path / "model.yaml"
    path.write_text("model: {preset: tiny, hidden_size: 32, depth: 2, num_heads: 2}\n")
    return str(path)


def _train(run: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "train", "--set", f"run_dir={run}", *SMALL, *extra]
    return subprocess.Popen(
        args, cwd=ROOT, env=_env() | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _losses(run: Path) -> dict[int, float]:
    """step -> loss from the run's log, which holds each optimizer step once (asserted)."""
    log = _jsonl(run / "log.jsonl")
    steps = [r["step"] for r in log]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in log}


def _accounting(run: Path) -> dict:
    """What the run's 6ND report is computed from, wall times left out."""
    from profiling import report

    records = read_ledgers([run / "ledger.jsonl"]).records
    kinds, shapes = report.summarize(records)
    return {
        "steps": sorted(r.step for r in records),
        "totals": {k: (g.n, g.tokens, g.measured, g.law, dict(g.measured_by_part)) for k, g in kinds.items()},
        "shapes": {k: [(s.shape, s.n, s.tokens, s.measured, s.law) for s in gs] for k, gs in shapes.items()},
    }


def _logged_steps(run: Path) -> int:
    try:
        return len((run / "log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _attempts(run: Path) -> int:
    try:
        return len((run / "attempts.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _kill_when(proc: subprocess.Popen, ready) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (it must not finish first)."""
    deadline = time.time() + 600
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _weights(run: Path) -> dict:
    """Every tensor of a finished run: the last checkpoint's model and loop state, the EMA pipeline."""
    from safetensors.torch import load_file

    files = [
        "checkpoints/step-0000030/model.safetensors",
        "checkpoints/step-0000030/train_state.safetensors",
        "pipeline/transformer/diffusion_pytorch_model.safetensors",
    ]
    return {(f, k): v for f in files for k, v in load_file(run / f).items()}


class _Payload:
    """Loading this pickle would create `marker`: a crafted file planted in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_sigkilled_three_times_one_mid_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    """A run SIGKILLed at three seeded points (one while a checkpoint is written, files complete but
    not yet renamed into place) and resumed each time ends with the uninterrupted run's losses,
    ledger and weights, bit for bit. While it holds its run directory, a second trainer there is
    refused at once, naming it; a crafted pickle planted in its newest checkpoint is never loaded."""
    import pickle
    import random

    from train import checkpoint

    rng = random.Random(20240607)
    model = ["--set", f"model={_model_yaml(tmp_path)}", "--set", "max_steps=30", "--set", "checkpoint_every=8"]
    full = _train(tmp_path / "full", *model)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    assert out.count("trained 30 steps") == 1

    run = tmp_path / "crash"
    first = _train(run, *model)  # 1: killed at a random step
    kill_at = rng.randint(2, 12)
    _kill_when(first, lambda: _attempts(run) == 1 and _logged_steps(run) >= kill_at)
    assert len(_losses(run)) >= kill_at and not (run / "pipeline").exists()

    pause = {checkpoint.PAUSE_BEFORE_PUBLISH: "120"}  # 2: killed while writing a checkpoint
    second, started = _train(run, *model, env=pause), time.time()

    def written() -> list[Path]:
        return [p for p in run.glob("checkpoints/.tmp-step-*/manifest.json") if p.stat().st_mtime >= started - 1]

    deadline = time.time() + 600
    while not written():
        assert second.poll() is None and time.time() < deadline, second.communicate()[0]
        time.sleep(0.02)
    rival = subprocess.run(
        [sys.executable, "-m", "train", "--set", f"run_dir={run}", *SMALL, *model],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rival.returncode == 1 and f"is in use by another trainer (pid {second.pid} on host" in rival.stderr, (
        rival.stderr
    )
    assert "Traceback" not in rival.stderr
    _kill_when(second, lambda: True)
    unpublished = written()[0].parent
    assert not (run / "checkpoints" / unpublished.name.removeprefix(".tmp-")).exists()

    third = _train(run, *model)  # 3: killed at a random later step
    kill_at = rng.randint(len(_losses(run)) + 2, 28)
    _kill_when(third, lambda: _attempts(run) == 3 and _logged_steps(run) >= kill_at)
    assert checkpoint.verify(checkpoint.latest(run / "checkpoints")) is None  # every kill left the newest one intact

    newest = checkpoint.latest(run / "checkpoints")
    marker = tmp_path / "pwned"
    (newest / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    resumed = _train(run, *model)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"{newest / 'custom_checkpoint_0.pkl'}: not in the manifest" in out and not marker.exists()
    assert "resumed from" in out
    assert _losses(run) == _losses(tmp_path / "full")  # bit-identical, every step, each once
    reference, got = _weights(tmp_path / "full"), _weights(run)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)

    # The ledger holds each optimizer step once, and the 6ND report equals the uninterrupted run's.
    assert _accounting(run) == _accounting(tmp_path / "full")
    assert _accounting(tmp_path / "full")["steps"] == list(range(1, 31))
    # Which attempt wrote each record; the redone steps' first records kept aside, not deleted.
    attempts = _jsonl(run / "attempts.jsonl")
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4]
    ledger = _jsonl(run / "ledger.jsonl")
    for attempt, start in enumerate([a["resumed_from"] for a in attempts], 1):
        assert all(r["attempt"] >= attempt for r in ledger if r["step"] > start)
    aside = _jsonl(run / "ledger.superseded.jsonl")
    assert aside and {r["attempt"] for r in aside} <= {1, 2, 3} and "superseded: " in out

    ledger = [json.loads(line) for line in (tmp_path / "full" / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 30 and all(r["measured_flops"] > 0 and r["parts"]["frozen"] > 0 for r in ledger)
    assert (tmp_path / "full" / "pipeline" / "pipeline.json").is_file()
    final = json.loads((tmp_path / "full" / "eval.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 30 and final["val_loss"] > 0 and 0 < final["score_chance"] < 1
    assert (tmp_path / "full" / "samples" / "step-0000030.png").is_file()


def test_real_data_with_corrupt_files_trains_and_reports(tmp_path):
    import numpy as np

    rows = ["path,text"]
    rng = np.random.default_rng(0)
    for i in range(6):
        frames = (rng.random((3, 16, 16, 3)) * 255).astype(np.uint8)
        write_video(tmp_path / f"ok{i}.mp4", frames, fps=8)
        rows.append(f"ok{i}.mp4,a clip number {i}")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(2048))
    rows += ["junk.mp4,random bytes", "missing.mp4,not there"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    proc = _train(
        tmp_path / "run",
        "--set",
        f"model={_model_yaml(tmp_path)}",
        "--set",
        "max_steps=2",
        "--set",
        "data.kind=folder",
        "--set",
        f"data.source={tmp_path / 'data.csv'}",
        "--set",
        "data.buckets=[[3,16,16]]",
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "6 usable, 2 skipped" in out and "junk.mp4" in out and "missing" in out
    assert len(_losses(tmp_path / "run")) == 2
    # A one-process CPU run: no line about GPUs, CUDA or accelerators (DeepSpeed's fallback warning, train.quiet).
    noise = [line for line in out.splitlines() if re.search(r"\b(GPU|CUDA|accelerator)s?\b", line, re.IGNORECASE)]
    assert not noise, noise
    # The bar's MFU and tokens/s are the run's so far: after the last step, what the closing report and the ledger say.
    bar_mfu = re.findall(r"mfu\(run\)=([\d.]+)%", out)
    assert bar_mfu and f"MFU {bar_mfu[-1]}%" in out, out
    ledger = _jsonl(tmp_path / "run" / "ledger.jsonl")
    bar_tok_s = int(re.findall(r"tok_s\(run\)=(\d+)", out)[-1])
    assert abs(bar_tok_s - sum(r["tokens"] for r in ledger) / sum(r["wall_s"] for r in ledger)) <= 1


def test_bad_config_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--set", "no_such_field=1"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown config key 'no_such_field'" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--set", "deepspeed=no/such.json"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "deepspeed: 'no/such.json' is not a file" in proc.stderr


# One TORCH_EXTENSIONS_DIR per machine: DeepSpeed compiles its shm op once (~40 s), then reuses it.
EXTENSIONS = str(Path.home() / ".cache" / "ministack" / "torch_extensions")


def _launch(tmp_path: Path, accelerate_config: str, run: str, *extra: str, cpu_env: bool = False) -> str:
    args = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / accelerate_config),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "train",
        "--set",
        f"run_dir={tmp_path / run}",
        "--set",
        f"model={_model_yaml(tmp_path)}",
        *SMALL,
        *extra,
    ]
    env = _env() | {"TORCH_EXTENSIONS_DIR": EXTENSIONS} | ({"ACCELERATE_USE_CPU": "1"} if cpu_env else {})
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_and_zero2_match_the_single_process_run(tmp_path, single_process_reference):
    """2 processes x batch 2 (DDP over gloo; DeepSpeed ZeRO-2) against 1 process x batch 4: the same
    global batches, per-sample noise and once-per-step LR give the same losses."""
    out = _launch(tmp_path, "ddp.yaml", "ddp", *FOUR_FP32_STEPS, cpu_env=True)
    assert out.count("trained 4 steps") == 1  # the main process says it, not every rank
    assert "8 records = 4 optimizer steps x 2 ranks" in out
    _launch(tmp_path, "zero2.yaml", "zero2", *FOUR_FP32_STEPS)
    reference = _losses(single_process_reference)
    assert len(reference) == 4
    for run in ("ddp", "zero2"):
        got = _losses(tmp_path / run)
        assert got.keys() == reference.keys()
        assert all(got[s] == pytest.approx(reference[s], rel=1e-4) for s in reference), (run, got, reference)
    ledger = _jsonl(tmp_path / "zero2" / "ledger.jsonl")
    assert sorted((r["step"], r["rank"]) for r in ledger) == [(s, r) for s in range(1, 5) for r in (0, 1)]
    assert all(
        r["world_size"] == 2 and "B=2, 4 samples/step" in r["shape"] for r in ledger
    )  # every rank records its share
    ddp = _accounting(tmp_path / "ddp")["totals"]["train"]
    one = _accounting(single_process_reference)["totals"]["train"]
    assert ddp[:2] == one[:2]  # the same optimizer steps and tokens as one process on the global batch


@pytest.mark.slow
def test_zero3_saves_and_resumes(tmp_path):
    first = _launch(tmp_path, "zero3.yaml", "z3", "--set", "max_steps=4", "--set", "checkpoint_every=2")
    assert "resumed" not in first
    before = _losses(tmp_path / "z3")
    second = _launch(tmp_path, "zero3.yaml", "z3", "--set", "max_steps=6", "--set", "checkpoint_every=2")
    assert "resumed from" in second and "step-0000004" in second
    after = _losses(tmp_path / "z3")
    assert sorted(after) == [1, 2, 3, 4, 5, 6] and all(after[s] == before[s] for s in before)
    assert (tmp_path / "z3" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
