"""Engine behaviour on a tiny random Llama: sampling controls, stops, n > 1 block sharing,
aborts, request validation, and per-request FLOPs against the op counter and the ledger."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from test_serve_model import DEVICE, make_engine, prompts

from profiling.formulas.llama import DECODER_PARTS, DecoderShape, decoder_flops
from profiling.ledger import read_ledgers
from serve.engine.model_runner import kv_bytes_per_block
from profiling.measure import count_flops
from serve.engine import SamplingParams
from serve.kernels import load


@pytest.fixture
def engine(tiny_llama, tmp_path):
    return make_engine(tiny_llama, tmp_path)


def tokens(engine, prompt, **params) -> list[int]:
    (out,) = engine.generate([prompt], SamplingParams(ignore_eos=True, **params))
    return out.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    a, b = prompts([12, 30], seed=7)
    first = tokens(engine, a, max_tokens=12, seed=3)
    outs = engine.generate(
        [b, a], [SamplingParams(max_tokens=5, ignore_eos=True), SamplingParams(max_tokens=12, seed=3, ignore_eos=True)]
    )
    assert outs[1].outputs[0].token_ids == first
    assert tokens(engine, a, max_tokens=12, seed=4) != first


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    (p,) = prompts([20], seed=8)
    greedy = tokens(engine, p, max_tokens=8, temperature=0)
    assert tokens(engine, p, max_tokens=8, temperature=1.5, top_k=1) == greedy
    assert tokens(engine, p, max_tokens=8, temperature=1.0, top_p=1e-6) == greedy


def test_stop_token_ids_eos_and_length(engine):
    (p,) = prompts([10], seed=9)
    greedy = tokens(engine, p, max_tokens=8, temperature=0)
    stop_at = next(i for i, t in enumerate(greedy) if t not in greedy[:i])  # first occurrence
    (out,) = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[greedy[stop_at]]))
    assert out.outputs[0].token_ids == greedy[: stop_at + 1]
    assert out.outputs[0].finish_reason == "stop"
    engine.eos_token_ids = {greedy[stop_at]}
    (out,) = engine.generate([p], SamplingParams(max_tokens=8, temperature=0))
    assert out.outputs[0].token_ids == greedy[: stop_at + 1] and out.outputs[0].finish_reason == "stop"
    (out,) = engine.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert out.outputs[0].token_ids == greedy and out.outputs[0].finish_reason == "length"


def test_n_sequences_share_the_prompt_blocks(engine):
    (p,) = prompts([40], seed=10)
    engine.add_request("n3", p, SamplingParams(n=3, max_tokens=6, seed=0, ignore_eos=True))
    request = engine.requests["n3"]
    finals = None
    shared = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            finals = out
        first_block = request.seqs[0].block_table[:1]
        if first_block:
            shared = max(shared, engine.block_manager.blocks[first_block[0]].ref_count)
    assert shared == 3  # one copy of the prompt's full blocks, three references
    assert [s.num_cached_tokens for s in request.seqs] == [0, 32, 32]
    assert len(finals.outputs) == 3 and all(len(c.token_ids) == 6 for c in finals.outputs)
    assert len({tuple(c.token_ids) for c in finals.outputs}) > 1  # independently sampled
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_abort_frees_blocks_and_unknown_id_is_a_no_op(engine):
    (p,) = prompts([50], seed=11)
    engine.add_request("x", p, SamplingParams(max_tokens=20))
    engine.step()
    assert engine.stats().kv_usage > 0
    engine.abort_request("x")
    engine.abort_request("never-seen")
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_usage == 0 and engine.stats().num_running == 0


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(n=0), "n"),
        (SamplingParams(logprobs=-2), "logprobs"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_the_field(params, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        params.validate()


def test_bad_requests_are_refused(engine):
    engine.add_request("dup", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request("oov", [5, 300], SamplingParams())
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        engine.add_request("t", [5], SamplingParams(temperature=-1))


def assert_step_flops_match_the_op_counter(engine, lengths: list[int], budget: int) -> None:
    """Runs requests of `lengths` (the third arriving one step late, the second scoring its
    prompt: an lm-head row per prompt position) and checks, every step, that the per-sequence
    FLOP shares sum to what profiling.measure counts from the ops."""
    engine.scheduler.max_num_batched_tokens = budget
    a, b, c = prompts(lengths, seed=12)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("a", a, params)
    engine.add_request("b", b, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0))
    steps = 0
    while engine.has_unfinished_requests():
        if steps == 1:
            engine.add_request("c", c, params)
        seqs = [s for r in engine.requests.values() for s in r.seqs]
        before = {s.seq_id: dict(s.flops) for s in seqs}
        counted = count_flops(engine.step, DECODER_PARTS)
        shares = defaultdict(int)
        for s in seqs:
            for part, n in s.flops.items():
                shares[part] += n - before[s.seq_id].get(part, 0)
        assert counted.by_part == {k: v for k, v in shares.items() if v}
        steps += 1
    assert steps >= 5


@pytest.mark.parametrize(
    "decode_path", ["paged-kernel", "gathered-one-call", "gathered-call-per-length", "half-weights"]
)
def test_runtime_flops_equal_the_counted_ops_of_each_step(tiny_llama, tmp_path, decode_path):
    """Decodes (in the paged kernel: each over its own context; gathered: padded to their
    group's longest), a first chunk (causal), a later chunk over its cached past (masked), a
    completing prefill: per-sequence shares sum to the op counter's, whichever way decodes run
    and whichever layout the linears have."""
    if decode_path in ("paged-kernel", "half-weights") and not (DEVICE.type == "cpu" and load()):
        pytest.skip("the C++ kernels are for the CPU")
    engine = make_engine(tiny_llama, tmp_path, half_weights=decode_path == "half-weights" or None)
    if decode_path.startswith("gathered"):
        engine.runner.decode_kernel = False
        engine.runner.group_cost = 0 if decode_path == "gathered-call-per-length" else 10**9
    assert_step_flops_match_the_op_counter(engine, [10, 5, 30], budget=20)


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["paged-kernel", "gathered"])
def test_runtime_flops_under_a_sliding_window(tmp_path, decode_kernel):
    """Window 24 on a Qwen2 whose layer 0 is full and layer 1 windowed: decodes clipped to it
    (kernel) or computed over everything then masked (gathered), band-masked chunk pasts."""
    from test_serve_model import windowed_model

    engine = make_engine(windowed_model("qwen2-mixed-layers"), tmp_path, max_num_batched_tokens=16)
    if decode_kernel and not engine.runner.decode_kernel:
        pytest.skip("no paged decode kernel on this device")
    engine.runner.decode_kernel = decode_kernel
    assert_step_flops_match_the_op_counter(engine, [40, 9, 60], budget=16)


def test_single_stream_flops_equal_the_exact_formula_and_land_in_the_ledger(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path / "model", ledger=str(tmp_path / "ledger.jsonl"))
    (p,) = prompts([21], seed=13)
    (out,) = engine.generate([p], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    shape = DecoderShape.from_hf(tiny_llama.config)
    exact = defaultdict(int)
    for q_len, past in [(21, 0)] + [(1, 21 + i) for i in range(4)]:  # prefill, then 4 decodes
        for part, n in decoder_flops(shape, q_len, past, logits=1).items():
            exact[part] += n
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert (m.prompt_tokens, m.generated_tokens, m.cached_prompt_tokens) == (21, 5, 0)
    assert m.flops_by_part == {k: v for k, v in exact.items() if v}
    assert m.law_flops == 2 * engine.law_params * (21 + 5)
    (record,) = read_ledgers([tmp_path / "ledger.jsonl"]).records
    assert (record.kind, record.request_id, record.tokens) == ("infer", out.request_id, 26)
    assert record.measured_flops == m.measured_flops and record.parts == m.flops_by_part
    assert record.shape == "prompt=21,gen=5" and record.law_flops == m.law_flops
    assert record.dtype == "fp32" and record.peak_flops > 0 and record.mfu > 0  # MFU vs this CPU's measured peak
    # bytes moved beside the FLOPs: every step read all weights (one sequence, one logits row),
    # the decodes read their contexts 22..25 from the cache, and 21 + 4 tokens' K/V were written
    traffic = engine.runner.traffic
    per_token = kv_bytes_per_block(shape, engine.config.block_size, torch.float32) // engine.config.block_size
    assert record.bytes_parts == {
        "weights": 5 * (traffic.dense_bytes + traffic.lm_head_bytes),
        "kv_read": per_token * sum(range(22, 26)),
        "kv_write": per_token * 25,
    }
    from profiling.report import format_report, summarize

    kinds, shapes = summarize([record])
    text = format_report(kinds, shapes, 0, bandwidth=1e12)
    assert f"{record.measured_flops / record.bytes_moved:.1f} FLOPs per byte" in text and "-bound" in text


def test_engine_config_is_checked_at_start(monkeypatch):
    from serve.config import EngineConfig

    with pytest.raises(ValueError, match="dtype must be"):
        EngineConfig(dtype="int8").validate()
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(kv_cache_bytes=1, kv_cache_fraction=0.5).validate()
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        EngineConfig(kv_cache_fraction=2.0).validate()
    monkeypatch.setattr("profiling.cpu.preferred_cpu_dtype", lambda: "fp32")
    with pytest.raises(ValueError, match="bfloat16 is slow on this CPU"):
        EngineConfig(dtype="bfloat16").torch_dtype()
    assert EngineConfig(dtype="auto").torch_dtype() == torch.float32
    monkeypatch.setattr("profiling.cpu.preferred_cpu_dtype", lambda: "bf16")
    assert EngineConfig(dtype="bfloat16").torch_dtype() == torch.bfloat16


def test_kv_budget_from_bytes_or_a_fraction_of_free_memory():
    from serve.config import EngineConfig, memory_available

    assert EngineConfig(kv_cache_bytes=12345).kv_cache_budget() == 12345
    assert EngineConfig().kv_cache_budget() == 1 << 30
    free = memory_available(torch.device("cpu"))
    assert 0 < EngineConfig(kv_cache_fraction=0.01).kv_cache_budget() <= free * 0.011


def test_start_up_reports_the_cache_capacity_and_caps_the_context_to_it(tiny_llama, tmp_path, capsys):
    """A cache smaller than the model's context (tiny_llama: 512) caps max_model_len, saying so;
    a max_model_len that was set and does not fit is refused, naming the flags that fix it."""
    engine = make_engine(tiny_llama, tmp_path, kv_cache_bytes=20 * 8192 + 5)  # 8 KiB per block
    out = capsys.readouterr().out
    assert "KV cache: 20 blocks x 16 tokens = 320 tokens" in out and "max_model_len capped to 320 tokens" in out
    assert engine.stats().max_tokens_in_cache == 320 and engine.max_model_len == 320
    with pytest.raises(ValueError, match=r"at most 320 \(max_model_len\)"):
        engine.add_request("big", [5] * 300, SamplingParams(max_tokens=21))
    engine.add_request("fits", [5] * 300, SamplingParams(max_tokens=20))
    with pytest.raises(
        ValueError, match="max_model_len 512 does not fit the KV cache .*--max-model-len.*--kv-cache-gb"
    ):
        make_engine(tiny_llama, tmp_path, kv_cache_bytes=20 * 8192, max_model_len=512)


def test_bfloat16_engine_runs_where_allowed(tiny_llama, tmp_path, monkeypatch):
    """The dtype plumbing (cache, masks, norms, logits) in a half-precision dtype, as on GPU."""
    monkeypatch.setattr("profiling.cpu.preferred_cpu_dtype", lambda: "bf16")
    engine = make_engine(tiny_llama, tmp_path, dtype="bfloat16")
    assert engine.runner.kv.dtype == torch.bfloat16
    a, b = prompts([20, 7], seed=15)
    outs = engine.generate([a, b], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_chunked_prefill_computes_exactly_the_causal_pairs(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path, max_num_batched_tokens=8)
    (p,) = prompts([21], seed=17)
    (out,) = engine.generate([p], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    exact = decoder_flops(DecoderShape.from_hf(tiny_llama.config), 21, 0, logits=1)  # as if in one piece
    assert out.metrics.flops_by_part == {k: v for k, v in exact.items() if v}


@pytest.mark.parametrize("kv_dtype,ratio", [("float16", 2.0), ("int8", 4 * 16 / (16 + 4))])
def test_a_compressed_kv_cache_holds_more_tokens_and_serves(tiny_llama, tmp_path, capsys, kv_dtype, ratio):
    """The same budget holds 2x (16-bit) or 3.2x (int8: tiny_llama's rows of 16 dims are 64 bytes
    in float32, 16 codes + a 4-byte scale in int8; SmolLM2's 64-dim rows: 3.76x) the float32
    cache's tokens; start-up and the stats say which; requests run through it."""
    budget = 400 * 8192
    full = make_engine(tiny_llama, tmp_path / "a", kv_cache_bytes=budget)
    small = make_engine(tiny_llama, tmp_path / "b", kv_cache_bytes=budget, kv_cache_dtype=kv_dtype)
    assert small.stats().max_tokens_in_cache == pytest.approx(ratio * full.stats().max_tokens_in_cache, rel=0.02)
    assert small.stats().kv_cache_dtype == kv_dtype and f"GiB, {kv_dtype}" in capsys.readouterr().out
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [len(o.outputs[0].token_ids) for o in small.generate([[5] * 40, [7] * 300], params)] == [12, 12]
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or one of"):
        make_engine(tiny_llama, tmp_path / "c", kv_cache_dtype="fp8")
