"""n-gram (prompt-lookup) speculative decoding: the proposer's lookup, and the engine's greedy
output unchanged with drafts on (alone and beside sampled requests), with acceptance counted."""

from __future__ import annotations

import pytest

from serve.api.metrics import ServingMetrics
from serve.engine import SamplingParams
from serve.engine.speculative import NgramProposer, accept
from test_serve_model import make_engine, prompts


def test_the_proposer_continues_the_most_recent_longest_match():
    proposer = NgramProposer(3, lookup_max=3, lookup_min=2)
    assert proposer.propose([1, 2, 3, 4, 9, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3], limit=10) == [5, 6, 7]  # the later 1 2 3
    assert proposer.propose([7, 8, 1, 2, 9, 9, 1, 2], limit=10) == [9, 9, 1]  # only the 2-gram 1 2 recurs
    assert proposer.propose([7, 8, 1, 2, 9, 9, 1, 2], limit=1) == [9]  # never past max_tokens
    assert proposer.propose([1, 2, 3, 4], limit=10) == []
    assert (
        accept([5, 6, 7], [5, 6, 8, 1]) == [5, 6, 8]
        and accept([5, 6], [5, 6, 4]) == [5, 6, 4]
        and accept([5], [2, 3]) == [2]
    )
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(3, lookup_max=2, lookup_min=3)


def test_greedy_output_is_unchanged_with_drafts_and_acceptance_is_counted(tiny_llama, tmp_path):
    """A random model's greedy continuations fall into loops, which n-gram drafts predict; the
    tokens must be exactly those of plain decoding (float32), for prompts of every kind, with
    a sampled request (never drafted) and a stop string in the same batches."""
    repetitive = [5, 6, 7, 8] * 12
    batch = prompts([30, 7, 50], seed=3) + [repetitive]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 4 + [
        SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True)
    ]
    batch.append(prompts([12], seed=4)[0])
    plain = make_engine(tiny_llama, tmp_path / "model").generate(batch, params)
    engine = make_engine(tiny_llama, tmp_path / "model", num_speculative_tokens=3)
    drafted = engine.generate(batch, params)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
    assert [o.outputs[0].finish_reason for o in drafted] == [o.outputs[0].finish_reason for o in plain]
    # a stop token met inside a run of accepted drafts ends the output where plain decoding does
    stop = plain[3].outputs[0].token_ids[9]
    stopping = SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop])
    (want,) = make_engine(tiny_llama, tmp_path / "model").generate([repetitive], stopping)
    (got,) = engine.generate([repetitive], stopping)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.outputs[0].finish_reason == "stop"
    stats = engine.stats()
    assert stats.spec_drafts > 0 and 0 < stats.spec_accepted_tokens <= stats.spec_draft_tokens
    assert engine.scheduler.running == [] and not engine.scheduler.waiting
    text = ServingMetrics("tiny", 512).render(stats)  # /metrics: vLLM's counters and the rate
    assert f'vllm:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {stats.spec_accepted_tokens}' in text
    assert (
        f'ministack:spec_decode_acceptance_rate{{model_name="tiny"}} {stats.spec_accepted_tokens / stats.spec_draft_tokens}'
        in text
    )
