"""`flops report`: validation against the law and the gap's attribution, from real counts."""

import math

import pytest
import torch

from model.dit import DiT, DiTConfig
from profiling import report
from profiling.formulas.llama import DECODER_PARTS
from profiling.ledger import Ledger, make_record, read_ledgers
from profiling.measure import count_flops, forward_backward
from profiling.parts import param_parts


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
        ledger.append(make_record("train", count, dit_params, tokens, 0.5, "cpu", "fp32", f"T={t} H={h} W={w}", 1e11, step=step))
    llama_params = param_parts(tiny_llama, DECODER_PARTS)
    for n in (16, 128, 480):
        ids = torch.randint(0, 300, (1, n))
        with torch.no_grad():
            count = count_flops(lambda: tiny_llama(ids, logits_to_keep=1), DECODER_PARTS, fake=True)
        ledger.append(make_record("infer", count, llama_params, n, 0.1, "cpu", "fp32", f"prompt={n}", 1e11, request_id=f"r{n}"))
    return ledger.path


def test_report_totals_and_attribution(ledger_path, tmp_path):
    kinds, shapes = report.summarize(read_ledgers([ledger_path]).records)
    for g in kinds.values():
        # the per-part gaps add up to the whole gap
        gap = sum(g.measured_by_part.get(p, 0) - g.law_by_part.get(p, 0) for p in set(g.measured_by_part) | set(g.law_by_part))
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
    png = report.plot(shapes, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(train.mfu)
