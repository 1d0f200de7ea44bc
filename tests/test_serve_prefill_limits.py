"""Prefill beside running decodes: the step cost model's fit, the ITL-derived prefill budget
(a cost model with known coefficients stands in for the measured one, so no timing is involved),
vLLM's long_prefill_token_threshold and max_num_partial_prefills, the settings' checks, and
greedy outputs unchanged by any of them on a tiny model."""

from __future__ import annotations

import random

import pytest
from test_serve_engine_scheduler import BS, run, seq
from test_serve_model import make_engine, prompts

from serve.config import EngineConfig
from serve.engine import SamplingParams
from serve.engine.block_manager import BlockManager
from serve.engine.scheduler import PrefillLimits, Scheduler
from serve.engine.sequence import Sequence
from serve.engine.step_cost import StepCoefficients, StepCostModel, StepShape, chunk_attention, is_prefill

# 10 ms a step, 1 ms a decode, 0.1 ms a prefill token, no attention term: with 8 decodes and a
# 30 ms target, 30 - 10 - 8 = 12 ms is left for prefill, i.e. 120 tokens
KNOWN = StepCoefficients(base=0.010, decode=0.001, prefill=0.0001, attention=0.0)


def scheduler(limits: PrefillLimits, budget: int = 512) -> Scheduler:
    return Scheduler(BlockManager(4096, BS), max_num_seqs=64, max_num_batched_tokens=budget, limits=limits)


def start_decodes(sched: Scheduler, count: int) -> list[Sequence]:
    """`count` short sequences prefilled and sampled once: decoding from the next step on."""
    decoding = [seq([1, 2, 3], i) for i in range(count)]
    for s in decoding:
        sched.add(s)
    run(sched)
    return decoding


def prefill_per_step(batch: list[tuple[Sequence, int]], long: Sequence) -> int:
    return sum(n for s, n in batch if s is long)


def test_the_fit_recovers_known_coefficients_from_step_times():
    truth = StepCoefficients(base=0.004, decode=0.0007, prefill=0.00015, attention=0.00002)
    model = StepCostModel(window=64)
    rng = random.Random(0)
    for _ in range(64):
        decodes, tokens, past = rng.randrange(0, 32), rng.choice([0, rng.randrange(1, 512)]), rng.randrange(0, 4000)
        shape = StepShape(decodes, tokens, chunk_attention(past, tokens))
        model.observe(shape, truth.predict(shape))
    fitted = model.coefficients
    for name in ("base", "decode", "prefill", "attention"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.05), name


def test_decode_only_steps_do_not_push_the_prefill_steps_out_of_the_fit():
    truth = StepCoefficients(base=0.004, decode=0.0007, prefill=0.00015, attention=0.0)
    model = StepCostModel(window=64)
    rng = random.Random(1)
    for _ in range(32):
        shape = StepShape(rng.randrange(0, 32), rng.randrange(1, 512), 0.0)
        model.observe(shape, truth.predict(shape))
    for _ in range(500):
        shape = StepShape(rng.randrange(0, 32), 0, 0.0)
        model.observe(shape, truth.predict(shape))
    assert model.coefficients.prefill == pytest.approx(truth.prefill, rel=0.05)


def test_before_any_step_the_conservative_prior_predicts():
    model = StepCostModel()
    shape = StepShape(8, 256, chunk_attention(0, 256))
    assert model.predict(shape) == pytest.approx(model.prior.predict(shape))
    assert model.predict(shape) > 0.2  # slower than any CPU step of this size measured here


def test_the_prefill_budget_is_the_largest_chunk_predicted_under_the_target():
    model = StepCostModel(prior=StepCoefficients(base=0.01, decode=0.001, prefill=0.0001, attention=0.00005))
    n = model.prefill_budget(0.05, decode_tokens=8, past=2000)
    predict = lambda k: model.predict(StepShape(8, k, chunk_attention(2000, k)))  # noqa: E731
    assert 0 < n and predict(n) <= 0.05 < predict(n + 1)
    assert model.prefill_budget(0.015, decode_tokens=8, past=0) == 0  # the decodes alone exceed it


def test_with_decodes_running_the_prefill_chunk_is_bounded_by_the_itl_budget():
    sched = scheduler(PrefillLimits(max_itl_s=0.030, cost=StepCostModel(prior=KNOWN)))
    start_decodes(sched, 8)
    long = seq(list(range(2000)), 100)
    sched.add(long)
    for _ in range(3):
        batch = run(sched)
        assert sum(n for s, n in batch if s is not long) == 8  # every decode still goes
        assert prefill_per_step(batch, long) == 120


def test_without_decodes_a_prompt_takes_the_whole_budget():
    sched = scheduler(PrefillLimits(max_itl_s=0.030, cost=StepCostModel(prior=KNOWN)))
    long = seq(list(range(2000)), 100)
    sched.add(long)
    assert [prefill_per_step(run(sched), long) for _ in range(3)] == [512, 512, 512]


def test_the_floor_lets_a_long_prompt_finish_under_an_unreachable_target():
    sched = scheduler(PrefillLimits(max_itl_s=0.001, cost=StepCostModel(prior=KNOWN), min_prefill_tokens=32))
    start_decodes(sched, 8)
    long = seq(list(range(1000)), 100)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        chunks.append(prefill_per_step(run(sched), long))
    assert set(chunks[:-1]) == {32} and sum(chunks) == 1000  # 32 a step, never starved


def test_long_prefill_token_threshold_caps_a_long_prompt_only():
    sched = scheduler(PrefillLimits(long_prefill_token_threshold=100, max_num_partial_prefills=2))
    long, short = seq(list(range(1000)), 0), seq(list(range(80)), 1)
    sched.add(long)
    sched.add(short)
    assert [(s.seq_id, n) for s, n in run(sched)] == [(0, 100), (1, 80)]  # 80 is not above the threshold


def test_one_partial_prefill_at_a_time_lets_only_short_prompts_in_beside_it():
    sched = scheduler(PrefillLimits(long_prefill_token_threshold=100))  # max_num_partial_prefills 1
    first, second, short = seq(list(range(1000)), 0), seq(list(range(1000, 2000)), 1), seq(list(range(40)), 2)
    for s in (first, second, short):
        sched.add(s)
    assert [(s.seq_id, n) for s, n in run(sched)] == [
        (0, 100)
    ]  # second would be left part-way: it waits, short behind it
    sched = scheduler(PrefillLimits(long_prefill_token_threshold=100))
    for s in (seq(list(range(1000)), 0), seq(list(range(40)), 2)):
        sched.add(s)
    assert [(s.seq_id, n) for s, n in run(sched)] == [(0, 100), (2, 40)]  # a prompt that completes is let in


def test_partial_prefills_share_the_prefill_budget():
    sched = scheduler(PrefillLimits(max_num_partial_prefills=2), budget=512)
    a, b = seq(list(range(1000)), 0), seq(list(range(1000, 2000)), 1)
    sched.add(a)
    sched.add(b)
    assert [(s.seq_id, n) for s, n in run(sched)] == [(0, 256), (1, 256)]
    assert [(s.seq_id, n) for s, n in run(sched)] == [(0, 256), (1, 256)]


@pytest.mark.parametrize(
    ("setting", "value", "flag"),
    [
        ("max_itl_ms", 0.0, "--max-itl-ms"),
        ("max_itl_ms", -5.0, "--max-itl-ms"),
        ("max_itl_ms", float("nan"), "--max-itl-ms"),
        ("long_prefill_token_threshold", -1, "--long-prefill-token-threshold"),
        ("max_num_partial_prefills", 0, "--max-num-partial-prefills"),
    ],
)
def test_invalid_settings_are_refused_naming_the_flag(setting, value, flag):
    with pytest.raises(ValueError, match=flag):
        EngineConfig(**{setting: value}).validate()


def test_greedy_outputs_do_not_depend_on_the_prefill_limits(tiny_llama, tmp_path):
    """Short prompts decode while a long one arrives; capping its chunks (a target no step meets:
    the floor's 32 tokens a step), a threshold, or shared partial prefills change only when its
    tokens are computed, never which tokens come out."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    short, long = prompts([12] * 6, seed=1), prompts([400], seed=2)[0]
    results, chunks = [], []
    for settings in ({}, {"max_itl_ms": 0.001}, {"long_prefill_token_threshold": 64, "max_num_partial_prefills": 2}):
        engine = make_engine(tiny_llama, tmp_path / str(len(results)), **settings)
        for i, p in enumerate(short):
            engine.add_request(f"s{i}", p, params)
        engine.step()
        engine.add_request("long", long, params)
        sizes: list[int] = []
        schedule = engine.scheduler.schedule

        def recording(schedule=schedule, sizes=sizes) -> list[tuple[Sequence, int]]:
            batch = schedule()
            sizes += [n for s, n in batch if s.request.request_id == "long" and is_prefill(s)]
            return batch

        engine.scheduler.schedule = recording
        outputs = {}
        while engine.has_unfinished_requests():
            outputs |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        results.append(outputs)
        chunks.append(sizes)
    assert results[1] == results[0] and results[2] == results[0]
    assert max(chunks[0]) > 300 and max(chunks[1]) == 32 and max(chunks[2]) == 64
