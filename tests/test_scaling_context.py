"""`ministack scaling context`: decode FLOPs per token counted by the op counter equal the
formula at every context and batch, the crossovers follow from their definitions, and the
command fails closed on what it cannot measure."""

from __future__ import annotations

import json

import pytest
from test_serve_model import make_engine

from profiling.formulas.llama import decoder_flops
from scaling.cli import main
from scaling.context import (
    WEIGHT_PARTS,
    ContextReport,
    DeviceBandwidth,
    analyze_context,
    decode_mbu,
    measure_context,
    measure_contexts,
    weight_bytes,
)
from scaling.plots import plot_context
from scaling.report import format_context


@pytest.mark.parametrize("batch", [1, 2])
def test_measured_decode_flops_equal_the_formula_and_the_crossovers_hold(tiny_llama, tmp_path, batch):
    engine = make_engine(tiny_llama, tmp_path / "model")
    points = measure_context(engine, [100, 8, 40], batch=batch, decode_tokens=3)
    assert [p.context for p in points] == [8, 40, 100]
    shape = engine.runner.flops.shape
    for p in points:
        formula = {k: v for k, v in decoder_flops(shape, q_len=1, past_len=p.context, logits=1).items() if v}
        assert p.decode_flops == formula == p.formula_flops
        assert p.law_flops == 2 * engine.law_params
        assert p.prefill_flops > p.context * p.weight_flops // 2  # a prompt's linears ran on every position
        assert p.kv_bytes == batch * (p.context + 1) * 2 * shape.layers * shape.kv_heads * shape.head_dim * 4
        assert p.tpot_s > 0 and p.tpot_spread_s[0] <= p.tpot_s <= p.tpot_spread_s[1]
    assert points[-1].attention_flops > points[0].attention_flops and points[-1].weight_flops == points[0].weight_flops

    analysis = analyze_context(points, weight_bytes(engine.model))
    assert analysis.measured_vs_formula_max_gap == 0
    at = analysis.attention_equals_weights_flops  # attention a*(L+1) = weights there
    weights = sum(decoder_flops(shape, q_len=1, past_len=0, logits=1)[k] for k in WEIGHT_PARTS)
    assert decoder_flops(shape, q_len=1, past_len=int(at) + 1, logits=1)["attention"] >= weights
    assert decoder_flops(shape, q_len=1, past_len=int(at) - 1, logits=1)["attention"] < weights
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert analysis.weight_bytes == params  # float32, tied embeddings: each storage once
    kv = analysis.kv_equals_weight_bytes
    assert batch * (kv + 1) * analysis.kv_bytes_per_key == pytest.approx(params)
    fit = analysis.tpot_fit
    assert fit is not None and fit.fixed_s > 0

    report = ContextReport(points, analysis, bandwidth=DeviceBandwidth(1e9, "test"))
    text = format_context(report)
    assert f"batch {batch}" in text and "within 0.00% of the formula" in text
    for p in points:  # MBU: the bytes a decode step reads over its TPOT over the bandwidth
        assert decode_mbu(p, analysis.weight_bytes, 1e9) == pytest.approx((params + p.kv_bytes) / p.tpot_s / 1e9)
    assert f" {decode_mbu(points[-1], params, 1e9):>6.1%}" in text and "/ TPOT / 1 GB/s (test)" in text
    assert plot_context(report, tmp_path / "context.png").stat().st_size > 10_000
    assert not engine.has_unfinished_requests()


def test_engines_measured_in_turn_see_the_same_prompts_and_step_alternately(tiny_llama, tmp_path, monkeypatch):
    """measure_contexts: one point per engine and context, the same prompts (the same FLOPs for
    the same model), and the timed decode steps taken one engine after the other."""
    engines = {kv: make_engine(tiny_llama, tmp_path / kv, kv_cache_dtype=kv) for kv in ("float32", "int8")}
    order = []
    for name, engine in engines.items():
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda step=step, name=name: (order.append(name), step())[1])
    points = measure_contexts(engines, [24, 8], decode_tokens=3)
    assert [p.context for p in points["float32"]] == [p.context for p in points["int8"]] == [8, 24]
    for a, b in zip(points["float32"], points["int8"]):
        assert a.decode_flops == b.decode_flops and a.prefill_flops == b.prefill_flops
        assert a.kv_bytes > 3 * b.kv_bytes  # float32 rows against int8 codes and a scale
    assert order[-6:] == ["float32", "int8"] * 3  # the last point's timed steps, in turn
    assert not any(engine.has_unfinished_requests() for engine in engines.values())


def test_refuses_what_it_cannot_measure(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path / "model", kv_cache_bytes=64 * 512)  # 64 tokens of K/V
    with pytest.raises(ValueError, match="at least 1 token"):
        measure_context(engine, [0])
    assert engine.max_model_len == 64  # the context is capped to what the cache holds
    with pytest.raises(ValueError, match="does not fit the model's 64"):
        measure_context(engine, [60], decode_tokens=16)
    with pytest.raises(ValueError, match="KV tokens"):
        measure_context(engine, [40], batch=2)
    with pytest.raises(ValueError, match="batch and decode_tokens"):
        measure_context(engine, [8], batch=0)
    with pytest.raises(ValueError, match="no context points"):
        analyze_context([], 1)


def test_cli_json_and_its_errors(tiny_llama, tmp_path, capsys):
    model = tmp_path / "model"
    tiny_llama.save_pretrained(model)
    base = ["context", "--model", str(model), "--dtype", "float32", "--kv-cache-gb", "0.01"]
    assert main([*base, "--contexts", "8,24,48", "--decode-tokens", "2", "--json", "--out", str(tmp_path / "ctx")]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the engine's KV-cache line
    assert [p["context"] for p in report["points"]] == [8, 24, 48] and report["dtype"] == "float32"
    assert report["peak"]["flops"] > 0
    assert json.loads((tmp_path / "ctx" / "context.json").read_text())["analysis"] == report["analysis"]
    assert (tmp_path / "ctx" / "context.png").is_file()
    assert main([*base, "--contexts", "8,24,48", "--decode-tokens", "2"]) == 0  # the table, TTFT against its bound
    assert "x bound: TTFT / (the prefill's measured FLOPs at" in capsys.readouterr().out
    assert main([*base, "--contexts", "8,lots"]) == 2
    assert "--contexts" in capsys.readouterr().err
    assert main([*base, "--contexts", "5000"]) == 2
    assert "--contexts, --batch, --decode-tokens, --kv-cache-gb" in capsys.readouterr().err


def test_weight_bytes_follow_the_stored_layout(tiny_llama, tmp_path):
    """float16-stored linears are read at 2 bytes per weight; norms and the (tied) embedding at 4."""
    from serve.kernels import load

    if not load():
        pytest.skip("the float16-weight kernel is built for the CPU only")
    full = weight_bytes(make_engine(tiny_llama, tmp_path / "a").model)
    engine = make_engine(tiny_llama, tmp_path / "b", half_weights=True)
    linears = sum(m.weight.numel() for m in engine.model.modules() if hasattr(m, "stored_weight"))
    assert weight_bytes(engine.model) == full - 2 * linears
