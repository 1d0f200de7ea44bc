"""Quick sanity numbers for the serve engine against transformers' generate, same process,
same weights (SmolLM2-135M-Instruct, fp32): single-stream decode tok/s, 16-concurrent
throughput, and a long-context prefill + decode. Not the benchmark (bench/serve_throughput.py
is); a check that the engine is not slower than the obvious baseline.

    python bench/serve_engine_quick.py [--gen 64] [--concurrent 16] [--long 8000]
"""

from __future__ import annotations

import argparse
import time

import torch

from serve.config import EngineConfig
from serve.engine import LLMEngine, SamplingParams
from serve.weights import resolve_model


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=g).tolist() for _ in range(n)]


def engine_run(engine: LLMEngine, batch: list[list[int]], gen: int) -> tuple[float, float]:
    """(seconds to the first tokens, seconds for everything)."""
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    first = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first is None and any(c.new_token_ids for o in outputs for c in o.outputs):
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


@torch.no_grad()
def hf_run(model, batch: list[list[int]], gen: int) -> tuple[float, float]:
    longest = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch])  # left padding
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=0)
    return first, time.perf_counter() - t0


@torch.no_grad()
def hf_long(model, prompt: list[int], gen: int) -> tuple[float, float]:
    """transformers' own cached decoding loop (what generate runs), timed per phase."""
    t0 = time.perf_counter()
    out = model(torch.tensor([prompt]), use_cache=True)
    first = time.perf_counter() - t0
    for _ in range(gen - 1):
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--long", type=int, default=8000, help="long-context prompt tokens (0: skip)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best counts")
    ap.add_argument("--skip-short", action="store_true", help="only the long-context run")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(dtype="float32", max_num_batched_tokens=512))
    hf = AutoModelForCausalLM.from_pretrained(
        resolve_model(None), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    print(f"torch threads {torch.get_num_threads()}")
    engine_run(engine, prompts(1, 16, seed=9), 4)  # warm-up
    for n in () if args.skip_short else (1, args.concurrent):
        batch = prompts(n, args.prompt)
        # alternate and keep each one's best: a shared machine's load swings between runs
        e_times, h_times = [], []
        for _ in range(args.repeat):
            e_times.append(engine_run(engine, batch, args.gen)[1])
            h_times.append(hf_run(hf, batch, args.gen)[1])
        e_total, h_total = min(e_times), min(h_times)
        tokens = n * args.gen
        print(
            f"{n:>3} x ({args.prompt} prompt + {args.gen} gen): engine {tokens / e_total:7.1f} tok/s   transformers {tokens / h_total:7.1f} tok/s"
        )
    if args.long:
        batch = prompts(1, args.long, seed=1)
        e_first, e_total = engine_run(engine, batch, 16)
        h_first, h_total = hf_long(hf, batch[0], 16)
        print(
            f"1 x ({args.long} prompt + 16 gen): prefill engine {e_first:.1f}s  transformers {h_first:.1f}s; "
            f"then 15 decodes: engine {15 / (e_total - e_first):.2f} tok/s  transformers {15 / (h_total - h_first):.2f} tok/s"
        )


if __name__ == "__main__":
    main()
