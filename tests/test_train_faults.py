"""Faults around a training run, each checked where it is decided: bad settings, damaged or
crafted checkpoints, a failing disk, non-finite steps, a second writer. In-process and fast;
the end-to-end runs (a crafted checkpoint resumed, a diverging lr) are marked slow."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.config import load_train_config
from train.faults import NonfiniteGuard, RunError, RunLock

from test_train import ROOT, _jsonl, _model_yaml, _train


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=-1", "lr: must be > 0, got -1.0"),
        ("lr=0", "lr: must be > 0, got 0.0"),
        ("lr=nan", "lr: must be a finite number, got nan"),
        ("lr=abc", "lr: expected a number, got 'abc'"),
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("grad_accum=0", "grad_accum: must be >= 1, got 0"),
        ("max_steps=0", "max_steps: must be >= 1, got 0"),
        ("checkpoint_every=0", "checkpoint_every: must be >= 1, got 0"),
        ("keep_checkpoints=0", "keep_checkpoints: must be >= 1, got 0"),
        ("ema_decay=1.5", "ema_decay: must be in [0, 1), got 1.5"),
        ("ema_decay=1", "ema_decay: must be in [0, 1), got 1.0"),
        ("cond_drop=2", "cond_drop: must be in [0, 1], got 2.0"),
        ("cond_drop=-0.1", "cond_drop: must be in [0, 1], got -0.1"),
        ("nonfinite=ignore", "nonfinite: must be one of 'skip', 'stop', got 'ignore'"),
        ("diffusion=sde", "diffusion: must be one of 'flow', 'ddpm', got 'sde'"),
        ("data.kind=webdataset", "data.kind: must be one of 'procedural', 'digits', 'folder'"),
        ("max_steps=[10]", "max_steps: expected int, got list [10]"),
        ("seed=1.5", "seed: expected int, got float 1.5"),
        ("gradient_checkpointing=3", "gradient_checkpointing: expected bool, got int 3"),
        ("vae.lr=-1", "vae.lr: must be > 0, got -1.0"),
        ("no_such_key=1", "unknown config key 'no_such_key'"),
        ("data.sizee=5", "unknown config key 'data.sizee'"),  # a nested key is named in full
        (
            "data.buckets=[[1,31,31],[5,32,32]]",
            "data.buckets: bucket 1x31x31",
        ),  # the tiny DiT's patch 2 does not divide it
    ],
)
def test_an_impossible_setting_is_refused_by_key(override, message):
    with pytest.raises(ValueError) as err:
        load_train_config("configs/train/tiny.yaml", [override])
    assert message in str(err.value)


def test_the_cli_refuses_a_bad_setting_with_exit_2_and_no_traceback(capsys):
    from train.cli import main

    assert main(["configs/train/tiny.yaml", "--set", "batch_size=0"]) == 2  # a misspelled key: known keys listed
    assert main(["configs/train/tiny.yaml", "--set", "data.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'batch_size'" in err and "data.batch_size: must be >= 1, got 0" in err
    assert "Traceback" not in err


def test_a_run_error_is_exit_1_with_its_message(monkeypatch, capsys, tmp_path):
    import train.loop
    from train.cli import main

    def fails(cfg):
        raise checkpoint.CheckpointError(
            f"writing the checkpoint of step 4 to {tmp_path} failed: No space left on device"
        )

    monkeypatch.setattr(train.loop, "train", fails)
    assert main(["configs/train/tiny.yaml"]) == 1
    err = capsys.readouterr().err
    assert "ministack train: error: writing the checkpoint of step 4" in err and "Traceback" not in err


# --- checkpoints ---------------------------------------------------------------------------------


class Counter:
    """A stateful object like the loop's sampler: plain numbers."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


@pytest.fixture
def run(tmp_path):
    """A real Accelerator (one CPU process) with a small model, its optimizer, an EMA, an LR
    schedule and a counter: `save(step)` trains one step and checkpoints it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from train.ema import EMA

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    states = {
        "ema": EMA(model, 0.9),
        "schedule": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1)),
        "sampler": Counter(),
    }

    class Run:
        root = tmp_path / "checkpoints"

        def step(self) -> None:
            model(torch.randn(4, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            states["schedule"].step()
            states["ema"].update(model)
            states["sampler"].position += 1

        def save(self, step: int) -> Path:
            self.step()
            return checkpoint.save(accelerator, self.root, step, {}, keep=3, states=states, model=model)

    Run.accelerator, Run.model, Run.states = accelerator, model, states
    yield Run()
    AcceleratorState._reset_state(True)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        "weights data byte",
        "safetensors header byte",
        "truncated optimizer",
        "ema byte",
        "manifest missing",
        "file added",
    ],
)
def test_a_damaged_checkpoint_is_named_and_the_one_before_is_used(run, damage, capsys):
    first = run.save(2)
    second = run.save(4)
    assert checkpoint.latest(run.root) == second
    target = {
        "weights data byte": "model.safetensors",
        "safetensors header byte": "model.safetensors",
        "truncated optimizer": "optimizer.bin",
        "ema byte": checkpoint.STATE_TENSORS,
        "manifest missing": checkpoint.MANIFEST,
        "file added": "extra.bin",
    }[damage]
    path = second / target
    if damage == "weights data byte":
        _flip(path, path.stat().st_size - 3)  # inside the last tensor's data
    elif damage == "safetensors header byte":
        _flip(path, 12)  # the JSON header right after its 8-byte length
    elif damage == "truncated optimizer":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "ema byte":
        _flip(path, path.stat().st_size - 1)
    elif damage == "manifest missing":
        path.unlink()
    else:
        path.write_bytes(b"\0")
    problem = checkpoint.verify(second)
    assert problem is not None and str(path) in problem
    assert checkpoint.latest(run.root) == first
    found, meta = checkpoint.resume(run.accelerator, run.root, run.states)
    assert found == first and meta["step"] == 2 and run.states["sampler"].position == 1
    assert f"checkpoint {second} is not usable: {path}" in capsys.readouterr().out


def test_only_damaged_checkpoints_is_an_error_not_a_fresh_start(run):
    only = run.save(2)
    _flip(only / "model.safetensors", 12)
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint under .*move .* aside"):
        checkpoint.resume(run.accelerator, run.root, run.states)


def test_resume_restores_the_loops_state_exactly(run):
    path = run.save(2)
    ema = {k: v.clone() for k, v in run.states["ema"].shadow.items()}
    lr = run.states["schedule"].get_last_lr()
    weights = [p.detach().clone() for p in run.model.parameters()]
    run.step()
    found, meta = checkpoint.resume(run.accelerator, run.root, run.states)
    assert found == path and meta["step"] == 2
    assert all(torch.equal(ema[k], v) for k, v in run.states["ema"].shadow.items())
    assert run.states["schedule"].get_last_lr() == lr and run.states["sampler"].position == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, run.model.parameters()))
    assert not list(path.glob("*.pkl")) or {p.name for p in path.glob("*.pkl")} == {"random_states_0.pkl"}


class Payload:
    """A pickle that, when loaded, creates a marker file: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rewrite_manifest(path: Path) -> None:
    """What an attacker with write access does too: make the manifest match the planted file."""
    (path / checkpoint.MANIFEST).unlink()
    checkpoint._write_manifest(path)


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(run, tmp_path, capsys):
    first = run.save(2)
    second = run.save(4)
    third = run.save(6)
    marker = tmp_path / "pwned"
    # an old-style pickle planted next to the files (accelerate read custom_checkpoint_*.pkl with weights_only=False)
    (third / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    # a torch.save file replaced by one carrying the payload, and the manifest rewritten to match it
    torch.save({"random_state": Payload(marker)}, second / "random_states_0.pkl")
    _rewrite_manifest(second)
    found, meta = checkpoint.resume(run.accelerator, run.root, run.states)
    out = capsys.readouterr().out
    assert found == first and meta["step"] == 2 and not marker.exists()
    assert f"{third / 'custom_checkpoint_0.pkl'}: not in the manifest" in out
    assert f"{second / 'random_states_0.pkl'}: references ['posix.system'], outside the weights-only allowlist" in out
    # and a torch.load on the resume path refuses it even past the scan
    with checkpoint.weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(second / "random_states_0.pkl", weights_only=False)
    assert not marker.exists()


def test_a_full_disk_leaves_the_last_good_checkpoint_and_says_so(run, monkeypatch):
    good = run.save(2)

    def disk_full(self, output_dir):
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 10)  # a partial write, then the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(run.accelerator), "save_state", disk_full)
    with pytest.raises(checkpoint.CheckpointError) as err:
        run.save(4)
    assert "No space left on device" in str(err.value) and str(good) in str(err.value)
    assert checkpoint.latest(run.root) == good and checkpoint.verify(good) is None
    assert sorted(p.name for p in run.root.iterdir()) == ["latest", "step-0000002"]  # the partial one removed


def test_non_finite_weights_are_never_saved(run):
    good = run.save(2)
    with torch.no_grad():
        next(run.model.parameters())[0, 0] = float("nan")
    with pytest.raises(
        checkpoint.CheckpointError, match="refusing to save the checkpoint of step 4: non-finite weights"
    ):
        checkpoint.save(run.accelerator, run.root, 4, {}, keep=1, states=run.states, model=run.model)
    assert checkpoint.latest(run.root) == good and not (run.root / "step-0000004").exists()


# --- non-finite steps ----------------------------------------------------------------------------


def test_a_non_finite_step_is_skipped_without_any_update(run):
    from train.meter import StepWindow
    from train.step import apply_update

    guard = NonfiniteGuard("skip", 2, log=lambda _: None)
    model, optimizer, schedule = run.model, None, run.states["schedule"]
    optimizer = schedule.optimizer
    before = [p.detach().clone() for p in model.parameters()]
    window = StepWindow()
    window.losses, window.sources, window.seeds = [torch.tensor(float("nan"))], ["clip-7"], [123]
    model(torch.randn(2, 8)).sum().mul(float("nan")).backward()
    lr = schedule.get_last_lr()
    assert apply_update(run.accelerator, model, optimizer, schedule, 1.0, guard, window, 5) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert schedule.get_last_lr() == lr and all(p.grad is None for p in model.parameters())
    window.losses = [torch.tensor(0.5)]
    model(torch.randn(2, 8)).sum().backward()
    assert apply_update(run.accelerator, model, optimizer, schedule, 1.0, guard, window, 5) == lr[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_guard_skips_a_few_in_a_row_then_stops_naming_the_step_and_batch():
    seen = []
    guard = NonfiniteGuard("skip", 2, log=seen.append)
    assert not guard.skip(1, True, "")
    assert guard.skip(2, False, "loss nan on sources ['a.mp4']") and guard.skip(3, False, "")
    assert not guard.skip(4, True, "") and guard.skip(5, False, "") and guard.skip(6, False, "")  # the streak restarted
    with pytest.raises(
        RunError, match=r"step 7: non-finite .*3 consecutive non-finite steps, more than max_nonfinite_steps=2"
    ):
        guard.skip(7, False, "")
    assert "step 2: non-finite loss or gradient norm: loss nan on sources ['a.mp4']: step skipped" in seen[0]
    with pytest.raises(RunError, match="step 1: .*nonfinite=stop"):
        NonfiniteGuard("stop", 3).skip(1, False, "")


def test_under_deepspeed_skip_becomes_stop_and_says_so():
    from accelerate.utils import DistributedType

    from train.config import TrainConfig
    from train.step import nonfinite_policy

    class Engine:
        distributed_type, said = DistributedType.DEEPSPEED, []

        def print(self, line: str) -> None:
            self.said.append(line)

    engine = Engine()
    assert nonfinite_policy(TrainConfig(nonfinite="skip"), engine) == "stop"
    assert "a non-finite step stops the run instead (as nonfinite=stop)" in engine.said[0]
    assert nonfinite_policy(TrainConfig(nonfinite="stop"), engine) == "stop"
    Engine.distributed_type = DistributedType.NO
    assert nonfinite_policy(TrainConfig(nonfinite="skip"), engine) == "skip" and len(engine.said) == 1


# --- one writer ----------------------------------------------------------------------------------


def test_a_second_writer_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    import socket

    with RunLock(tmp_path):
        with pytest.raises(RunError) as err:
            RunLock(tmp_path).acquire()
        assert f"in use by another trainer (pid {os.getpid()} on host {socket.gethostname()}, started " in str(
            err.value
        )
        other = subprocess.run(
            [sys.executable, "-c", f"from train.faults import RunLock; RunLock({str(tmp_path)!r}).acquire()"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    with RunLock(tmp_path):  # released at exit: free again
        pass


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_1_and_never_checkpoints_non_finite_weights(tmp_path):
    """lr=1e30: the loss goes non-finite within a few steps. The default policy skips those steps
    (no update), then stops the run after max_nonfinite_steps of them in a row: exit 1, the step,
    loss and batch in the message, no traceback, and every checkpoint left holds finite weights."""
    from safetensors.torch import load_file

    proc = _train(
        tmp_path / "run",
        "--set",
        f"model={_model_yaml(tmp_path)}",
        "--set",
        "lr=1e30",
        "--set",
        "max_steps=20",
        "--set",
        "checkpoint_every=1",
        "--set",
        "max_nonfinite_steps=2",
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "trained" not in out
    skipped = [line for line in out.splitlines() if "step skipped, no update" in line]
    assert len(skipped) == 2 and "non-finite loss or gradient norm: loss " in skipped[0] and "noise seeds" in skipped[0]
    error = out[out.index("ministack train: error: ") :]
    assert (
        "3 consecutive non-finite steps, more than max_nonfinite_steps=2" in error
        and "on the batch of sources" in error
    )
    stopped_at = int(error.split("error: step ")[1].split(":")[0])
    steps = [r["step"] for r in _jsonl(tmp_path / "run" / "log.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and stopped_at == len(steps) + 1  # skipped steps are not counted
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved and all(checkpoint.verify(p) is None for p in saved)
    for path in saved:
        for name in ("model.safetensors", checkpoint.STATE_TENSORS):
            assert all(torch.isfinite(t).all() for t in load_file(path / name).values() if t.is_floating_point())


def test_submitits_pickle_folder_is_private(tmp_path):
    from scaling.slurm import private_folder

    folder = private_folder(tmp_path / "sweep" / "slurm")
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700


def _children(pid: int) -> set[int]:
    """The live children of process `pid` (every thread's, from /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            found |= {int(c) for c in f.read().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_ranks_die_with_their_launcher(tmp_path):
    """kill -9 of `accelerate launch` takes its training ranks with it (they would otherwise train on,
    holding the run directory's lock): the run directory is free again at once."""
    import signal
    import time

    from test_train import SMALL, _env

    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "train",
        "--set",
        f"run_dir={run}",
        "--set",
        f"model={_model_yaml(tmp_path)}",
        *SMALL,
        "--set",
        "max_steps=100000",
    ]
    launcher = subprocess.Popen(
        args, cwd=ROOT, env=_env() | {"ACCELERATE_USE_CPU": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (run / "log.jsonl").is_file() or not (run / "log.jsonl").read_text():  # both ranks are training
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.1)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while any(_alive(r) for r in ranks):
        assert time.time() < deadline, f"ranks {ranks} outlived their launcher"
        time.sleep(0.1)
    while True:  # a killed rank's threads may still be exiting after its main thread shows as gone
        try:
            with RunLock(run):  # no rank holds the run directory any more
                break
        except RunError:
            assert time.time() < deadline, "the run directory's lock outlived the ranks"
            time.sleep(0.1)
