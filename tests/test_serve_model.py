"""The engine's model against transformers' implementation of the same weights (fp32):
greedy tokens and logprobs across prompt lengths, mixed prefill+decode batches, chunked
prefill, prefix-cache hits, preemption, Qwen2 biases with untied embeddings, RoPE scaling.

On a GPU machine the same suite runs on CUDA (engine and reference both there) with
MINISTACK_TEST_DEVICE=cuda; CI runs it on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from serve.config import EngineConfig
from serve.engine import LLMEngine, SamplingParams
from serve.engine.model_runner import length_groups
from serve.kernels import load

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
DEVICE = torch.device(os.environ.get("MINISTACK_TEST_DEVICE", "cpu"))


def make_engine(hf_model, path, **overrides) -> LLMEngine:
    """An engine over hf_model's weights, saved as a transformers directory at path."""
    hf_model.save_pretrained(path)
    settings = {"model": str(path), "device": str(DEVICE), "dtype": "float32", "kv_cache_bytes": 1 << 20} | overrides
    return LLMEngine(EngineConfig(**settings))


def prompts(lengths: list[int], vocab: int = 300, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def reference(hf_model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation (full forward each step) and its log-softmax rows."""
    hf_model.to(DEVICE)
    ids, rows = list(prompt), []
    for _ in range(steps):
        logprobs = torch.log_softmax(hf_model(torch.tensor([ids], device=DEVICE)).logits[0, -1].float(), -1).cpu()
        rows.append(logprobs)
        ids.append(int(logprobs.argmax()))
    return ids[len(prompt) :], torch.stack(rows)


def assert_matches(hf_model, prompt: list[int], completion, atol: float = 2e-4) -> None:
    tokens, rows = reference(hf_model, prompt, len(completion.token_ids))
    assert completion.token_ids == tokens
    for entry, row in zip(completion.logprobs, rows):
        assert entry["logprob"] == pytest.approx(float(row[entry["token_id"]]), abs=atol)
        for alt in entry["top"]:
            assert alt["logprob"] == pytest.approx(float(row[alt["token_id"]]), abs=atol)


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["paged-kernel", "gathered"])
def test_greedy_matches_transformers_across_prompt_lengths(tiny_llama, tmp_path, decode_kernel):
    engine = make_engine(tiny_llama, tmp_path)
    if decode_kernel and not engine.runner.decode_kernel:
        pytest.skip("no paged decode kernel on this device")
    engine.runner.decode_kernel = decode_kernel
    ps = prompts([1, 7, 16, 17, 45])
    for prompt, out in zip(ps, engine.generate(ps, GREEDY)):  # one mixed batch of five lengths
        assert_matches(tiny_llama, prompt, out.outputs[0])


def test_chunked_prefill_beside_running_decodes(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path, max_num_batched_tokens=8)
    ps = prompts([5, 37, 20], seed=1)
    batches = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: batches.append(schedule()) or batches[-1]
    engine.add_request("a", ps[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3))
    done = {}
    for step in range(200):
        if step == 2:  # 'a' decodes while the long prompts arrive and prefill in chunks of <= 8
            engine.add_request("b", ps[1], GREEDY)
            engine.add_request("c", ps[2], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if step > 2 and not engine.has_unfinished_requests():
            break
    assert all(sum(n for _, n in batch) <= 8 for batch in batches)
    mixed = [
        b for b in batches if any(s.request.request_id == "a" and n == 1 for s, n in b) and any(n > 1 for _, n in b)
    ]
    assert len(mixed) >= 4  # b's five chunks and c's three ran beside a's decodes
    for rid, prompt in zip("abc", ps):
        assert_matches(tiny_llama, prompt, done[rid].outputs[0])


def test_decodes_in_length_groups_match_transformers(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path)
    engine.runner.decode_kernel = False  # the gathered path (CUDA's; the CPU's without the kernel)
    engine.runner.group_cost = 4  # cheap calls: decodes of different lengths go in separate calls
    calls = []
    plan = engine.runner._plan_decodes
    engine.runner._plan_decodes = lambda seqs, start: calls.append(len(seqs)) or plan(seqs, start)
    ps = prompts([3, 4, 30, 31, 60], seed=7)
    for prompt, out in zip(ps, engine.generate(ps, GREEDY)):
        assert_matches(tiny_llama, prompt, out.outputs[0])
    assert len(calls) > GREEDY.max_tokens and max(calls) > 1  # several calls per step, some shared


def test_half_weights_match_transformers_on_the_same_rounded_weights(tiny_llama, tmp_path):
    """half_weights stores every linear weight (lm-head included, not the embedding) in float16
    and computes in float32: exactly transformers on weights rounded through float16."""
    import copy

    if DEVICE.type != "cpu" or not load():
        pytest.skip("half weights are a CPU layout, built by the C++ kernels")
    engine = make_engine(tiny_llama, tmp_path, half_weights=True)
    rounded = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(module.weight.half().float())
        rounded.lm_head.weight = torch.nn.Parameter(
            rounded.model.embed_tokens.weight.half().float()
        )  # untied: the embedding stays exact
    ps = prompts([1, 9, 33], seed=5)
    for prompt, out in zip(ps, engine.generate(ps, GREEDY)):
        assert_matches(rounded, prompt, out.outputs[0])


@torch.no_grad()
def test_prompt_logprobs_match_transformers_chunked_and_past_the_prefix_cache(tiny_llama, tmp_path):
    """Each prompt token's logprob (and top-3) from one full forward of transformers: prompts
    prefilled in chunks of 8, one of them already in the prefix cache (which a prompt-logprobs
    request must not use), n = 2 (the prompt scored once)."""
    engine = make_engine(tiny_llama, tmp_path, max_num_batched_tokens=8)
    ps = prompts([1, 9, 40], seed=21)
    engine.generate([ps[2]], SamplingParams(max_tokens=2, temperature=0))  # ps[2]'s blocks now cached
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=3, n=2)
    for prompt, out in zip(ps, engine.generate(ps, params)):
        assert out.metrics.cached_prompt_tokens == 0
        rows = torch.log_softmax(tiny_llama(torch.tensor([prompt])).logits[0].float(), -1)
        entries = out.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for p, entry in enumerate(entries[1:], start=1):
            assert entry["token_id"] == prompt[p]
            assert entry["logprob"] == pytest.approx(float(rows[p - 1, prompt[p]]), abs=2e-4)
            assert [t["token_id"] for t in entry["top"]] == rows[p - 1].topk(3).indices.tolist()
        assert out.outputs[0].token_ids == out.outputs[1].token_ids  # greedy siblings agree


def test_half_weights_are_on_by_default_only_when_the_dtype_is_left_to_auto():
    cpu = {"device": "cpu"}
    assert EngineConfig(dtype="float32", **cpu).use_half_weights(torch.float32) is False  # explicit float32: exact
    assert EngineConfig(dtype="auto", **cpu).use_half_weights(torch.float32) is load()
    assert EngineConfig(dtype="auto", **cpu).use_half_weights(torch.bfloat16) is False  # a bf16 CPU keeps bf16
    assert EngineConfig(dtype="auto", half_weights=False, **cpu).use_half_weights(torch.float32) is False
    with pytest.raises(ValueError, match="half_weights needs the CPU, dtype float32"):
        EngineConfig(half_weights=True, **cpu).use_half_weights(torch.bfloat16)


@pytest.mark.parametrize("lengths", [[5, 6, 7], [1, 2, 300, 301, 302, 900], [10] * 9, list(range(1, 40, 3))])
@pytest.mark.parametrize("cost", [0, 16, 256])
def test_length_groups_are_the_cheapest_cut(lengths, cost):
    """The dynamic program against every way of cutting the sorted lengths into runs."""
    from itertools import combinations

    def cost_of(sizes):
        total, i = 0, 0
        for size in sizes:
            total += size * lengths[i + size - 1] + cost
            i += size
        return total

    n = len(lengths)
    cuts = (c for k in range(n) for c in combinations(range(1, n), k))
    brute = min(cost_of([b - a for a, b in zip((0, *c), (*c, n))]) for c in cuts)
    sizes = length_groups(lengths, cost)
    assert sum(sizes) == n and cost_of(sizes) == brute


def test_prefix_cache_hit_gives_identical_output(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path)
    first, tail = prompts([40, 9], seed=2)
    second = first[:35] + tail  # shares two full 16-token blocks with the first
    (out1,) = engine.generate([first], GREEDY)
    hits = engine.stats().prefix_cache_hits
    (out2,) = engine.generate([second], GREEDY)
    assert engine.stats().prefix_cache_hits - hits == 32
    assert out2.metrics.cached_prompt_tokens == 32
    assert_matches(tiny_llama, first, out1.outputs[0])
    assert_matches(tiny_llama, second, out2.outputs[0])
    (again,) = engine.generate([first], GREEDY)  # all but the last, partial block cached
    assert again.metrics.cached_prompt_tokens == 32
    assert again.outputs[0].token_ids == out1.outputs[0].token_ids


def test_preemption_loses_and_corrupts_nothing(tiny_llama, tmp_path):
    # 12 blocks of 16 = 192 tokens for 4 sequences growing to 50 tokens each: someone must go
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, layers, block, kv heads, head dim, fp32
    engine = make_engine(tiny_llama, tmp_path, kv_cache_bytes=12 * per_block, enable_prefix_caching=False)
    ps = prompts([30, 28, 31, 26], seed=3)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=0)
    outs = engine.generate(ps, params)
    assert engine.stats().num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    for prompt, out in zip(ps, outs):
        assert out.outputs[0].finish_reason == "length"
        assert_matches(tiny_llama, prompt, out.outputs[0])
        with torch.no_grad():  # the prompt's logprobs survive the recompute unchanged
            rows = torch.log_softmax(tiny_llama(torch.tensor([prompt])).logits[0].float(), -1)
        assert [e["logprob"] for e in out.prompt_logprobs[1:]] == pytest.approx(
            [float(rows[p - 1, prompt[p]]) for p in range(1, len(prompt))], abs=2e-4
        )


def test_long_context_in_chunks_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=4096,
        initializer_range=0.1,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    engine = make_engine(model, tmp_path, kv_cache_bytes=8 << 20, max_num_batched_tokens=512)
    ps = prompts([4000, 700], seed=14)  # eight chunks over a growing past, beside a shorter request
    outs = engine.generate(ps, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=2))
    for prompt, out in zip(ps, outs):
        assert_matches(model, prompt, out.outputs[0])


def test_qwen2_biases_and_untied_embeddings(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases, so a missing one shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    engine = make_engine(model, tmp_path)
    assert engine.model.lm_head.weight is not engine.model.model.embed_tokens.weight
    ps = prompts([11, 30], seed=4)
    for prompt, out in zip(ps, engine.generate(ps, GREEDY)):
        assert_matches(model, prompt, out.outputs[0])


def windowed_model(kind: str, window: int = 24):
    """A tiny Mistral (every layer windowed) or Qwen2 (layer 0 full, layer 1 windowed)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=300,
        max_position_embeddings=512,
    )
    if kind == "mistral":
        cfg, cls = MistralConfig(num_key_value_heads=1, sliding_window=window, **shape), MistralForCausalLM
    else:
        cfg, cls = (
            Qwen2Config(
                num_key_value_heads=2, use_sliding_window=True, sliding_window=window, max_window_layers=1, **shape
            ),
            Qwen2ForCausalLM,
        )
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["paged-kernel", "gathered"])
@pytest.mark.parametrize("kind", ["mistral", "qwen2-mixed-layers"])
def test_sliding_window_matches_transformers_past_the_window(tmp_path, kind, decode_kernel):
    """Window 24, chunks of <= 16: prompts shorter than, near and far past the window, chunked
    prefills whose past calls need the band, decodes past it, then a prefix-cache hit."""
    model = windowed_model(kind)
    engine = make_engine(model, tmp_path, max_num_batched_tokens=16)
    if decode_kernel and not engine.runner.decode_kernel:
        pytest.skip("no paged decode kernel on this device")
    engine.runner.decode_kernel = decode_kernel
    engine.runner.group_cost = 4  # gathered: several groups, some padded
    assert engine.max_model_len == 512  # the whole context: the window is implemented, not a cap
    ps = prompts([5, 20, 30, 70], seed=16)
    for prompt, out in zip(ps, engine.generate(ps, GREEDY)):
        assert_matches(model, prompt, out.outputs[0])
    (again,) = engine.generate([ps[3]], GREEDY)  # its blocks are cached: the past starts mid-window
    assert again.metrics.cached_prompt_tokens > 24
    assert_matches(model, ps[3], again.outputs[0])


@pytest.mark.parametrize("decode_kernel", [True, False], ids=["paged-kernel", "gathered"])
def test_sliding_window_releases_blocks_behind_it(tmp_path, decode_kernel):
    """Mistral (every layer windowed, 24): blocks that slid out of the window are released, so
    two sequences of 130 tokens run in a cache of 8 blocks (128 tokens) and still match
    transformers; a cache that fits one window, one chunk and two blocks admits them at all."""
    model = windowed_model("mistral")
    per_block = 2 * 2 * 16 * 1 * 16 * 4  # K and V, layers, block, kv heads, head dim, fp32
    engine = make_engine(model, tmp_path, max_num_batched_tokens=16, kv_cache_bytes=8 * per_block)
    if decode_kernel and not engine.runner.decode_kernel:
        pytest.skip("no paged decode kernel on this device")
    engine.runner.decode_kernel = decode_kernel
    ps = prompts([70, 50], seed=22)
    outs = engine.generate(
        ps, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=1) for n in (60, 80)]
    )
    for prompt, out in zip(ps, outs):
        assert_matches(model, prompt, out.outputs[0])
    assert engine.stats().num_preemptions == 0  # released blocks made the room, not preemption
    assert engine.block_manager.num_free == engine.block_manager.num_blocks  # every reference dropped once


def test_sliding_window_needs_chunks_inside_it(tmp_path):
    with pytest.raises(ValueError, match="max_num_batched_tokens 24 must be below the model's sliding window 24"):
        make_engine(windowed_model("mistral"), tmp_path, max_num_batched_tokens=24)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_transformers(rope, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=32 if rope["rope_type"] != "yarn" else 64,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    engine = make_engine(model, tmp_path)
    assert engine.max_model_len == 64  # the scaled context, beyond the original 32
    (prompt,) = prompts([63], seed=5)  # dynamic NTK: transformers scales for this length, as we do at max_model_len
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=5))
    assert_matches(model, prompt, out.outputs[0])


def test_rope_scaling_override_extends_the_context(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    rope = {"rope_type": "linear", "factor": 2.0}
    engine = make_engine(tiny_llama, tmp_path, rope_scaling=rope, max_model_len=1024)
    assert engine.max_model_len == 1024
    scaled_cfg = tiny_llama.config.__class__(
        **(tiny_llama.config.to_dict() | {"rope_parameters": {"rope_theta": 10000.0, **rope}})
    )
    scaled_cfg._attn_implementation = "sdpa"
    scaled = LlamaForCausalLM(scaled_cfg).eval()
    scaled.load_state_dict(tiny_llama.state_dict())
    short, (prompt,) = prompts([60], seed=7)[0], prompts([600], seed=6)  # within / past the model's own 512 positions
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=3)
    native_out, out = engine.generate([short, prompt], greedy)  # one batch: rows of both tables
    assert_matches(scaled, prompt, out.outputs[0])
    assert_matches(tiny_llama, short, native_out.outputs[0])  # the scaling is applied only where needed
    # the native request's cached blocks are another cache's: a scaled prompt sharing them recomputes
    (again,) = engine.generate([short + prompt[: 600 - len(short)]], greedy)
    assert again.metrics.cached_prompt_tokens == 0
    assert_matches(scaled, short + prompt[: 600 - len(short)], again.outputs[0])
    with pytest.raises(ValueError, match="exceeds the model's context 512"):
        make_engine(tiny_llama, tmp_path, max_model_len=1024)


def test_prompt_too_long_is_a_clear_error(tiny_llama, tmp_path):
    engine = make_engine(tiny_llama, tmp_path)
    with pytest.raises(ValueError, match=r"prompt has 500 tokens; this model allows at most 512 \(max_model_len\)"):
        engine.add_request("x", [5] * 500, SamplingParams(max_tokens=16))
    assert not engine.has_unfinished_requests()
