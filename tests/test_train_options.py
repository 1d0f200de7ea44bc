"""Training options that change how a step runs, not what it computes: precision and torch.compile."""

import json

import pytest

import profiling.cpu
from train.loop import mixed_precision

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
    proc = _train(root / name, "--set", f"model={_model_yaml(root)}", "--set", "max_steps=3",
                  "--set", "eval_prompts=2", "--set", "eval_sampling_steps=2", *extra)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    return _losses(root / name)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> dict[int, float]:
    """The eager fp32 run both options are compared with."""
    return _run(tmp_path_factory.mktemp("reference"), "fp32")


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, fp32):
    bf16 = _run(tmp_path, "bf16", "--set", "mixed_precision=bf16")
    assert bf16.keys() == fp32.keys()
    assert all(bf16[k] == pytest.approx(fp32[k], rel=0.05) for k in fp32)  # same run, bf16 rounding
    assert any(bf16[k] != fp32[k] for k in fp32)  # and it really ran in bf16
    ledger = [json.loads(line) for line in (tmp_path / "bf16" / "ledger.jsonl").read_text().splitlines()]
    assert {r["dtype"] for r in ledger} == {"bf16"}


def test_torch_compile_trains_like_eager(tmp_path, fp32):
    compiled = _run(tmp_path, "compiled", "--set", "compile=true")
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
    from train.loop import any_rank_empty

    full, empty = {"captions": ["a clip"]}, {"captions": []}
    assert any_rank_empty(_Ranks(other_empty=True), full)  # the other rank's clips all failed: skip here too
    assert any_rank_empty(_Ranks(other_empty=False), empty)
    assert not any_rank_empty(_Ranks(other_empty=False), full)
