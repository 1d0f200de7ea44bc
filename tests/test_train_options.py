"""Training options that change how a step runs, not what it computes: precision and torch.compile."""

import json

import pytest

import profiling.cpu
from train.accelerator import mixed_precision

from test_train import _losses, _model_yaml, _train


def test_auto_precision_is_bf16_only_where_it_pays(monkeypatch):
    assert mixed_precision("auto", cuda=True) == "bf16"
    monkeypatch.setattr(profiling.cpu, "preferred_cpu_dtype", lambda: "bf16")
    assert mixed_precision("auto", cuda=False) == "bf16"  # a CPU whose bf16 matmul measured clearly faster
    monkeypatch.setattr(profiling.cpu, "preferred_cpu_dtype", lambda: "fp32")
    assert mixed_precision("auto", cuda=False) == "no"
    assert mixed_precision("bf16", cuda=False) == "bf16" and mixed_precision("no", cuda=True) == "no"
    with pytest.raises(ValueError, match="mixed_precision must be"):
        mixed_precision("fp8", cuda=False)


def _run(root, name: str, *extra: str) -> dict[int, float]:
    proc = _train(
        root / name,
        "--set",
        f"model={_model_yaml(root)}",
        "--set",
        "max_steps=3",
        "--set",
        "eval_prompts=2",
        "--set",
        "eval_sampling_steps=2",
        *extra,
    )
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    return _losses(root / name)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> dict[int, float]:
    """The eager fp32 run both options are compared with (explicit: "auto" is bf16 on a CPU where bf16 is fast)."""
    return _run(tmp_path_factory.mktemp("reference"), "fp32", "--set", "mixed_precision=no")


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, fp32):
    bf16 = _run(tmp_path, "bf16", "--set", "mixed_precision=bf16")
    assert bf16.keys() == fp32.keys()
    assert all(bf16[k] == pytest.approx(fp32[k], rel=0.05) for k in fp32)  # same run, bf16 rounding
    assert any(bf16[k] != fp32[k] for k in fp32)  # and it really ran in bf16
    ledger = [json.loads(line) for line in (tmp_path / "bf16" / "ledger.jsonl").read_text().splitlines()]
    assert {r["dtype"] for r in ledger} == {"bf16"}


def test_torch_compile_trains_like_eager(tmp_path, fp32):
    compiled = _run(tmp_path, "compiled", "--set", "compile=true", "--set", "mixed_precision=no")
    assert compiled.keys() == fp32.keys()
    assert all(compiled[k] == pytest.approx(fp32[k], rel=1e-3) for k in fp32)
    assert (tmp_path / "compiled" / "pipeline" / "pipeline.json").is_file()  # saving unwraps the compiled model


class _Ranks:
    """Two ranks' view of accelerator.reduce, for any_rank_empty."""

    num_processes, device = 2, "cpu"

    def __init__(self, other_empty: bool) -> None:
        self.other = float(other_empty)

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.other


def test_a_batch_empty_on_one_rank_is_skipped_by_all():
    from train.step import any_rank_empty

    full, empty = {"captions": ["a clip"]}, {"captions": []}
    assert any_rank_empty(_Ranks(other_empty=True), full)  # the other rank's clips all failed: skip here too
    assert any_rank_empty(_Ranks(other_empty=False), empty)
    assert not any_rank_empty(_Ranks(other_empty=False), full)


def test_grad_accum_logs_the_step_it_ran(tmp_path):
    """With grad_accum 2 a step covers two micro-batches: the log and ledger say so, and the LR
    logged is the one the step used (warm-up over 2 steps: 1e-3 / 2 at step 1, then 1e-3)."""
    _run(tmp_path, "accum", "--set", "grad_accum=2")
    log = [json.loads(line) for line in (tmp_path / "accum" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log[:2]] == [pytest.approx(5e-4), pytest.approx(1e-3)]
    assert [r["samples"] for r in log] == [4, 4, 4]
    ledger = [json.loads(line) for line in (tmp_path / "accum" / "ledger.jsonl").read_text().splitlines()]
    assert all(r["shape"].startswith("B=2 x2 accum, 4 samples/step, latent=") for r in ledger)


def test_the_logged_loss_is_the_mean_over_the_accumulation_window():
    import torch

    from train.meter import StepWindow

    window = StepWindow()
    for loss, batch in ((1.0, 2), (3.0, 3)):
        window.add(None, 10 * batch, (batch, 4, 1, 8, 8))
        window.losses.append(torch.tensor(loss))
    loss_sum, micro, samples, stop = window.totals("cpu").tolist()
    assert (loss_sum / micro, samples, stop) == (2.0, 5.0, 0.0)
    assert window.totals("cpu", stop=True).tolist()[3] == 1.0  # a stop request rides along (train/preempt.py)
    assert window.shape(2, 10) == "B=2/3 x2 accum, 10 samples/step, latent=1x8x8"


def test_a_string_field_takes_no_as_text_and_a_yaml_boolean_is_refused(tmp_path):
    from train.config import load_train_config

    assert load_train_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\n")  # YAML 1.1: an unquoted no is False
    with pytest.raises(ValueError, match="YAML boolean False: quote it"):
        load_train_config(path)


def test_deepspeed_from_both_the_accelerate_config_and_the_run_is_refused(monkeypatch):
    """`accelerate launch` with a ZeRO config sets ACCELERATE_USE_DEEPSPEED; a run's own
    `deepspeed:` JSON on top would leave which one applies to accelerate's internals."""
    from train.config import TrainConfig
    from train.accelerator import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="accelerate config already sets up DeepSpeed"):
        make_accelerator(TrainConfig(deepspeed="configs/deepspeed/zero2.json"))
