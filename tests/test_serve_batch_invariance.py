"""Batch invariance: a request gets the same tokens and the same logprobs alone and inside a
mixed batch (other prompts of other lengths, prefill chunks beside decodes), bit for bit, on
the real SmolLM2 with its float16-stored weights (the default on CPUs without fast bf16): the
half-weight linear computes each row by itself in a fixed order, and the paged attention
kernels reduce each sequence alone. Where it does not hold is measured, not asserted exact:
float32 weights go through torch's GEMM, whose kernel choice depends on the batch's row
count (SmolLM2's logprobs then move by about 1e-5, greedy tokens unchanged here), and bf16
rounds those differences up to about 0.05 nats (docs/serving.md)."""

from __future__ import annotations

import pytest

from serve.config import EngineConfig
from serve.engine import SamplingParams
from serve.engine.llm_engine import LLMEngine

TEXTS = [
    "The history of the Roman Empire begins",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived " * 5,
    "Paris is",
    "1, 2, 3, 4,",
]


@pytest.mark.parametrize("budget", [2048, 16])  # every prompt prefilled whole, or in chunks that differ
def test_alone_equals_inside_a_mixed_batch_with_half_weights(budget):
    engine = LLMEngine(
        EngineConfig(
            model=None,
            dtype="float32",
            half_weights=True,
            max_model_len=1024,
            kv_cache_bytes=64 << 20,
            max_num_batched_tokens=budget,
            enable_prefix_caching=False,
        )
    )
    prompts = [engine.tokenizer.encode(t) for t in TEXTS]
    watched = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    alone = engine.generate([prompts[0]], watched)[0].outputs[0]
    others = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in (7, 30, 3, 11)]
    mixed = engine.generate(prompts[1:3] + [prompts[0]] + prompts[3:], others[:2] + [watched] + others[2:])[2].outputs[
        0
    ]
    assert mixed.token_ids == alone.token_ids

    def entries(out):
        return [(e["token_id"], e["logprob"], [(t["token_id"], t["logprob"]) for t in e["top"]]) for e in out.logprobs]

    if budget == 2048:  # the same prefill, then decode steps of any company: bit for bit
        assert entries(mixed) == entries(alone)
    else:  # the prompt split into other chunks: the same tokens, logprobs within rounding
        assert [e["logprob"] for e in mixed.logprobs] == pytest.approx([e["logprob"] for e in alone.logprobs], abs=1e-5)
