"""`flops report`: validation against the law and the gap's attribution, from real counts."""

import json
import math

import pytest
import torch

from model.dit import DiT, DiTConfig
from profiling import report
from profiling.formulas.llama import DECODER_PARTS
from profiling.hardware import DevicePeak
from profiling.ledger import Ledger, make_record, read_ledgers
from profiling.measure import FlopCount, count_flops, forward_backward
from profiling.parts import param_parts

PEAK = DevicePeak("cpu", "fp32", 1e11, "test")


@pytest.fixture
def ledger_path(tmp_path, tiny_llama):
    """A ledger of real counts: DiT training steps at two sizes, decoder requests at three contexts."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    cfg = DiTConfig(hidden_size=64, depth=2, num_heads=4, text_dim=32)
    dit = DiT.from_dit_config(cfg)
    dit_params = param_parts(dit, dit.flop_parts)
    for step, (t, h, w) in enumerate([(1, 8, 8), (4, 8, 8), (4, 8, 8)]):
        x, c = torch.randn(2, 4, t, h, w), torch.randn(2, 6, 32)
        count = count_flops(forward_backward(dit, x, torch.rand(2), context=c), dit.flop_parts, fake=True)
        tokens = 2 * cfg.num_tokens(t, h, w)
        ledger.append(make_record("train", count, dit_params, tokens, 0.5, PEAK, f"T={t} H={h} W={w}", step=step))
    llama_params = param_parts(tiny_llama, DECODER_PARTS)
    for n in (16, 128, 480):
        ids = torch.randint(0, 300, (1, n))
        with torch.no_grad():
            count = count_flops(lambda: tiny_llama(ids, logits_to_keep=1), DECODER_PARTS, fake=True)  # noqa: B023 (called at once, inside the iteration)
        ledger.append(make_record("infer", count, llama_params, n, 0.1, PEAK, f"prompt={n}", request_id=f"r{n}"))
    return ledger.path


def test_report_totals_and_attribution(ledger_path, tmp_path):
    kinds, shapes = report.summarize(read_ledgers([ledger_path]).records)
    for g in kinds.values():
        # the per-part gaps add up to the whole gap
        gap = sum(
            g.measured_by_part.get(p, 0) - g.law_by_part.get(p, 0) for p in set(g.measured_by_part) | set(g.law_by_part)
        )
        assert gap == pytest.approx(g.measured - g.law, rel=1e-9)
    train = kinds["train"]
    assert train.records == 3 and train.ratio < 1  # per-sample adaLN weights are charged per token by 6ND
    assert train.law_by_part["per_sample"] > 10 * train.measured_by_part["per_sample"]  # ~tokens per sample
    # inference: attention's share grows with context length
    attn = [g.share("attention") for g in shapes["infer"]]
    assert [g.shape for g in shapes["infer"]] == ["prompt=16", "prompt=128", "prompt=480"]
    assert attn[0] < attn[1] < attn[2]
    assert kinds["infer"].mfu == pytest.approx(kinds["infer"].measured / (0.3 * 1e11))
    text = report.format_report(kinds, shapes, skipped=0)
    for needle in ("== train", "== infer", "per_sample", "attention", "QK^T", "6ND", "2NT"):
        assert needle in text
    train_text, infer_text = text.split("== infer")
    assert (
        "backward" in train_text and "backward" not in infer_text and "forward only" in infer_text
    )  # each ledger's own why
    png = report.plot(shapes, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(train.mfu)


def _step(step: int, rank: int, flops: int, world: int = 2):
    peak = DevicePeak("cpu", "fp32", 1e4, "probe (test)")
    return make_record(
        "train",
        FlopCount({"dense": flops}),
        {"dense": 10},
        5,
        1.0,
        peak,
        "B=2, 4 samples/step, latent=1x4x4",
        run="r",
        step=step,
        rank=rank,
        world_size=world,
    )


def test_ranks_records_sum_into_one_optimizer_step():
    # 2 steps x 2 ranks: each rank records its own half of the step (its 5 tokens, its FLOPs).
    records = [_step(s, r, 600 + 100 * r) for s in (1, 2) for r in (0, 1)]
    kinds, shapes = report.summarize(records)
    g = kinds["train"]
    assert g.records == 4 and g.n == 2 and g.ranks == 2 and g.tokens == 20
    row = shapes["train"][0]
    assert row.measured / row.n == 600 + 700 and row.tokens / row.n == 10  # per step = both ranks' shares
    assert row.law / row.n == 6 * 10 * 10
    text = report.format_report(kinds, shapes, skipped=0)
    assert "== train: 4 records = 2 optimizer steps x 2 ranks, 20 tokens (all ranks), law 6ND ==" in text
    assert "MFU against peak 1e+04 FLOP/s (probe (test))" in text
    assert report.summarize([_step(1, 0, 600, world=1)])[0]["train"].to_dict()["steps"] == 1


def test_a_corrected_peak_re_derives_mfu_and_a_peak_below_the_records_is_refused():
    records = [_step(1, 0, 600), _step(1, 1, 900)]  # 600 and 900 FLOP/s against a kept peak of 1e4
    assert report.summarize(records)[0]["train"].mfu == pytest.approx(1500 / 2e4)
    kinds, _ = report.summarize(records, peak_flops=1000.0)
    assert kinds["train"].mfu == pytest.approx(1500 / 2000)
    assert kinds["train"].to_dict()["peaks"] == [{"flops": 1000.0, "source": "--peak-flops", "records": 2}]
    with pytest.raises(
        ValueError, match=r"--peak-flops 800 FLOP/s is below what a record achieved \(900 FLOP/s, train step 1\)"
    ):
        report.summarize(records, peak_flops=800.0)


def test_a_peak_raised_step_after_step_is_summarized_lowest_to_highest():
    peak = DevicePeak("cpu", "fp32", 100.0, "probe (test)")
    records = [
        make_record("train", FlopCount({"dense": f}), {"dense": 10}, 5, 1.0, peak, "s", run="r", step=i)
        for i, f in enumerate((50, 120, 150, 90, 200), start=1)
    ]
    kinds, shapes = report.summarize(records)
    assert max(r.mfu for r in records) == 1.0
    text = report.format_report(kinds, shapes, skipped=0)
    assert (
        "MFU against peaks from 100 FLOP/s (probe (test); 1 record) to 200 FLOP/s (raised to 200 FLOP/s by "
        "train step 5 (was 100 FLOP/s, probe (test)); 1 record), 2 more between"
    ) in text


def test_flops_demo_reports_its_ledger_with_the_reports_own_flags(ledger_path, tmp_path, monkeypatch, capsys):
    """The demo hands its ledger to `flops report` through report's own parser: every flag the
    report reads has its default (it crashed when --bandwidth was added and the demo not told)."""
    import argparse

    from model.flops import demo

    def record(ledger: Ledger, *_) -> None:  # the demo's measuring stands in as the fixture's records
        for r in read_ledgers([ledger_path]).records:
            ledger.append(r)

    monkeypatch.setattr(demo, "train_steps", record)
    monkeypatch.setattr(demo, "prefills", lambda *_: None)
    out = tmp_path / "demo"
    assert demo.run(argparse.Namespace(out=str(out), steps=1, contexts="16", device="cpu")) == 0
    assert "== train: 3 records" in capsys.readouterr().out and (out / "flops.png").is_file()


def _served(ledger: Ledger, request: str, bytes_parts: dict[str, int], wall_s: float) -> None:
    peak = DevicePeak("test-device", "fp32", 1e12, "probe (test)")
    ledger.append(
        make_record(
            "infer",
            FlopCount({"dense": 1000}),
            {"dense": 10},
            10,
            wall_s,
            peak,
            "prompt=8,gen=2",
            bytes_parts,
            request_id=request,
        )
    )


def test_mbu_is_bytes_over_time_over_the_bandwidth_given_or_probed(tmp_path, monkeypatch, capsys):
    """MBU from a written ledger: 6 GB moved in 2 s against 10 GB/s is 30%; without --bandwidth the
    records' device's cached probe is the denominator, and the report says so."""
    import argparse

    from profiling.bandwidth import Bandwidth, _store
    from profiling.load import Load

    monkeypatch.setenv("MINISTACK_CACHE", str(tmp_path))
    ledger = Ledger(tmp_path / "served.jsonl")
    _served(ledger, "a", {"weights": 3_000_000_000, "kv_read": 1_000_000_000}, 1.0)
    _served(ledger, "b", {"weights": 1_500_000_000, "kv_read": 400_000_000, "kv_write": 100_000_000}, 1.0)
    records = read_ledgers([ledger.path]).records
    kinds, shapes = report.summarize(records)
    assert kinds["infer"].mbu(10e9) == pytest.approx(0.3) and math.isnan(kinds["infer"].mbu(None))
    args = argparse.Namespace(
        ledgers=[str(ledger.path)], plot=str(tmp_path / "p.png"), json=False, peak_flops=None, bandwidth=None
    )
    report.run(args)
    assert "no probed bandwidth of test-device: `ministack flops peak` on it probes one" in capsys.readouterr().out
    _store(Bandwidth("test-device", 10e9, {"copy": 10e9}, 1 << 26, 1.8e9, Load(1.0, (0.0, 0.0, 0.0), 0.0)))
    report.run(args)
    text = capsys.readouterr().out
    assert "MBU 30.0% (3 GB/s moved, modelled) against 10 GB/s (probe 2027-01-15 08:00 UTC, quiet" in text
    assert "test-device" in text and " 30.0% " in text  # the shape's row too
    report.run(argparse.Namespace(**{**vars(args), "bandwidth": 20e9, "json": True}))
    out = json.loads(capsys.readouterr().out)
    assert out["kinds"]["infer"]["mbu"] == pytest.approx(0.15) and out["bandwidth"] == {
        "bytes_per_s": 20e9,
        "source": "--bandwidth",
    }
