"""Decode speed and capacity of each KV-cache dtype at long contexts, the dtypes measured in turn.

For every `--kv-cache-dtype` (float32, bfloat16, float16, int8) the same model (`--dtype`)
prefills one random prompt per context length and times the decode steps after it (median of
`--decode-tokens`, scaling.context.measure_contexts: the engine's own step, batch `--batch`).
One engine per dtype, all alive at once, their timed steps taken in turn (one step of each a
round): this VM's speed wanders by tens of percent over minutes, and dtypes measured one after
another compared the drift as much as the caches. Each engine's cache holds what the longest
context needs (at most `--kv-cache-gb`); the capacity column is what `--kv-cache-gb` holds.
At long contexts a decode step reads more K/V than weights, and on a CPU it is bound by memory
bandwidth, so the cache's bytes per token set its speed. Contexts past the model's own window
run under YaRN (factor = what the longest needs). Prints TPOT, tokens/s and the ratio to the
float32 cache at each context, and each dtype's bytes per token, capacity in the budget and how
many sequences of the longest context fit in it at once (capacity // (longest + its decode
tokens), blocks rounded up);
`--out FILE` saves the JSON.

    python bench/kv_cache_dtypes.py --contexts 2048,8192,16384 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling.context import measure_contexts  # noqa: E402
from serve.config import KV_DTYPES as KV_CACHE_DTYPES, EngineConfig  # noqa: E402
from serve.engine.llm_engine import LLMEngine  # noqa: E402
from serve.engine.model_runner import kv_bytes_per_block  # noqa: E402

if TYPE_CHECKING:
    from profiling.formulas.llama import DecoderShape

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--contexts", default="2048,8192,16384", help="prompt lengths, tokens")
    p.add_argument("--kv-cache-dtypes", default=",".join(KV_DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=4.0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _engines(
    args: argparse.Namespace, contexts: list[int], shape: DecoderShape
) -> tuple[dict[str, LLMEngine], dict | None]:
    """One engine per KV cache dtype, each with room for the longest context, and the RoPE
    scaling that reach needs beyond the model's native length (None within it)."""
    from transformers import AutoConfig

    from serve.weights import resolve_model

    native = AutoConfig.from_pretrained(resolve_model(args.model)).max_position_embeddings
    # room for the timed decodes and, with a batch, the tokens the first sequences decode while
    # the later ones still prefill (scaling.context measures that way)
    longest = contexts[-1] + args.decode_tokens + args.batch * (contexts[-1] // 256 + 2) + 64
    rope = None
    if longest > native:
        rope = {
            "rope_type": "yarn",
            "factor": float(2 ** math.ceil(math.log2(longest / native))),
            "original_max_position_embeddings": native,
        }
    budget, block = int(args.kv_cache_gb * 2**30), EngineConfig().block_size
    engines = {}
    for kv in args.kv_cache_dtypes.split(","):
        per_block = kv_bytes_per_block(shape, block, KV_CACHE_DTYPES[kv])
        need = (args.batch * (longest + 2 * block) // block + 8) * per_block  # every sequence's blocks, a few spare
        engines[kv] = LLMEngine(
            EngineConfig(
                model=args.model,
                dtype=args.dtype,
                kv_cache_dtype=kv,
                kv_cache_bytes=min(budget, need),
                enable_prefix_caching=False,
                rope_scaling=rope,
                max_model_len=longest,
                max_num_seqs=args.batch,
            )
        )
    return engines, rope


def _table(rows: list[dict], contexts: list[int], decode_tokens: int, block: int) -> None:
    """The markdown table: bytes and capacity per KV dtype, tokens/s per context against float32's."""
    base = {r["context"]: r["tokens_per_s"] for r in rows if r["kv_cache_dtype"] == "float32"}
    per_sequence = (
        -(-(contexts[-1] + decode_tokens) // block) * block
    )  # the longest context's blocks, its decodes included
    print(
        f"| KV cache | bytes / token | capacity (tokens) | sequences of {contexts[-1]} at once | "
        + " | ".join(f"{c} tok/s (vs float32)" for c in contexts)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(contexts))
    for kv in dict.fromkeys(r["kv_cache_dtype"] for r in rows):
        mine = {r["context"]: r for r in rows if r["kv_cache_dtype"] == kv}
        cells = [
            f"{mine[c]['tokens_per_s']:.2f} ({mine[c]['tokens_per_s'] / base[c]:.2f}x)"
            if c in base
            else f"{mine[c]['tokens_per_s']:.2f}"
            for c in contexts
        ]
        first = next(iter(mine.values()))
        print(
            f"| {kv} | {first['kv_bytes_per_token']:,} | {first['capacity_tokens']:,} | {first['capacity_tokens'] // per_sequence} | "
            + " | ".join(cells)
            + " |"
        )


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig

    from profiling.formulas.llama import DecoderShape
    from serve.weights import resolve_model

    args = _args(argv)
    contexts = sorted(int(c) for c in args.contexts.split(","))
    shape = DecoderShape.from_hf(AutoConfig.from_pretrained(resolve_model(args.model)))
    engines, rope = _engines(args, contexts, shape)
    budget, block = int(args.kv_cache_gb * 2**30), EngineConfig().block_size
    rows = []
    for kv, points in measure_contexts(engines, contexts, batch=args.batch, decode_tokens=args.decode_tokens).items():
        per_token = kv_bytes_per_block(shape, 1, engines[kv].kv_dtype)
        capacity = budget // kv_bytes_per_block(shape, block, engines[kv].kv_dtype) * block
        for point in points:
            rows.append(
                {
                    "kv_cache_dtype": kv,
                    "context": point.context,
                    "tpot_s": point.tpot_s,
                    "tokens_per_s": args.batch / point.tpot_s,
                    "tpot_spread_s": point.tpot_spread_s,
                    "ttft_s": point.ttft_s,
                    "kv_bytes_per_token": per_token,
                    "capacity_tokens": capacity,
                }
            )
            print(
                f"  {kv:<9} context {point.context:>6}: TPOT {point.tpot_s * 1e3:7.1f} ms (fastest {point.tpot_spread_s[0] * 1e3:.1f}, "
                f"slowest {point.tpot_spread_s[1] * 1e3:.1f})  TTFT {point.ttft_s:6.1f} s",
                flush=True,
            )
    print(
        f"\nmodel dtype {args.dtype}, batch {args.batch}, rope {rope or 'native'}, KV budget {args.kv_cache_gb} GiB\n"
    )
    _table(rows, contexts, args.decode_tokens, block)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rope": rope, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
