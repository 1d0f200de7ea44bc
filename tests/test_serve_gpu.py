"""The engine's CUDA-only paths: the memory-efficient kernel that returns the log-sum-exps a
chunk after a cached past is merged with, bf16 serving against fp32 transformers, and the
KV budget taken as a fraction of free GPU memory. (The fp32 correctness suite runs on CUDA
too: MINISTACK_TEST_DEVICE=cuda pytest tests/test_serve_model.py.)"""

from __future__ import annotations

import pytest
import torch

from serve.config import EngineConfig
from serve.engine import LLMEngine, SamplingParams
from serve.layers.attention import attention_with_lse

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_lse_on_cuda_matches_the_math(dtype, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=dtype) for n in (37, 37, 37))
    out, lse = attention_with_lse(q, k, v, causal=causal)
    scores = (q.float() @ k.float().transpose(-1, -2)) / 64**0.5
    if causal:
        scores = scores.masked_fill(torch.ones(37, 37, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lse.float(), scores.logsumexp(-1), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), scores.softmax(-1) @ v.float(), atol=tol, rtol=tol)


def test_bf16_engine_on_cuda_tracks_fp32_transformers(tiny_llama, tmp_path):
    """bf16 weights and KV (the CUDA default) with chunked prefill over a cached past: every
    sampled token's logprob within bf16 noise of fp32 transformers fed the same tokens."""
    tiny_llama.save_pretrained(tmp_path)
    engine = LLMEngine(
        EngineConfig(
            model=str(tmp_path), device="cuda", dtype="auto", kv_cache_fraction=0.01, max_num_batched_tokens=16
        )
    )
    assert engine.runner.kv.dtype == torch.bfloat16 and engine.runner.kv.is_cuda
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 40, 70)]
    outs = engine.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1))
    model = tiny_llama.cuda()
    worst = 0.0
    for prompt, out in zip(ps, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0].float()
        ref = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        for i, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
            worst = max(worst, abs(entry["logprob"] - float(ref[i, tok])))
            assert float(ref[i, tok]) >= float(ref[i].max()) - 0.1  # greedy in bf16 picks an fp32 near-argmax
    assert worst < 0.05


def test_kv_budget_is_a_fraction_of_free_gpu_memory(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    free = torch.cuda.mem_get_info()[0]
    engine = LLMEngine(EngineConfig(model=str(tmp_path), device="cuda", dtype="float32", kv_cache_fraction=0.02))
    kv_bytes = engine.runner.kv.numel() * engine.runner.kv.element_size()
    assert 0.015 * free < kv_bytes <= 0.02 * free
