"""The bf16 pairs linear (serve.kernels' `linear_bf16`) against oneDNN's packed bf16 matmul.

Every matmul of one SmolLM2-135M forward (30 layers of qkv 576->960, o 576->576, gate/up
576->3072, down 1536->576, and the tied lm-head 576->49152), with random bf16 weights laid out
as `serve.layers.linear` lays them out at load, at each row count: the time of the whole set,
median and minimum over `--rounds` rounds, the two layouts interleaved in one process so that
both see the same machine. Decode steps are the small row counts; a prefill chunk is 512.
Needs a CPU with AVX-512 BF16.

    python bench/linear_kernels.py --rows 1,4,16,64,128,512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from profiling.cpu import prepare_cpu  # noqa: E402
from serve.kernels import op  # noqa: E402
from serve.layers.linear import BATCH_HINT, can_pack_pairs, pack_pairs  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of one layer
LAYERS, VOCAB, HIDDEN = 30, 49152, 576


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16,64,128,512", help="row counts (tokens in the batch)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds; the first is a warm-up")
    args = p.parse_args()
    prepare_cpu()
    if not can_pack_pairs(torch.device("cpu"), torch.bfloat16):
        sys.exit("this CPU (or build) has no AVX-512 BF16 pairs kernel")
    torch.manual_seed(0)
    weights = [torch.randn(o, i, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS) for o, i in SHAPES]
    weights.append(torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16) * 0.02)
    pairs = [pack_pairs(w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT) for w in weights]
    linear_bf16 = op("linear_bf16")
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    rows = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[int, str], list[float]] = {}
    for round_ in range(args.rounds):
        for m in rows:
            inputs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in {i for _, i in SHAPES}}
            for name in ("pairs", "onednn"):
                start = time.perf_counter()
                for w, packed, reordered in zip(weights, pairs, onednn):
                    x = inputs[w.shape[1]]
                    if name == "pairs":
                        linear_bf16(x, packed, w.shape[0], None)
                    else:
                        torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], "")
                if round_:
                    times.setdefault((m, name), []).append(time.perf_counter() - start)
    print(
        f"{len(weights)} matmuls, {weight_bytes / 2**20:.0f} MiB of bf16 weights; medians (minimum) of {args.rounds - 1} rounds\n"
    )
    print("| rows | pairs kernel | oneDNN packed | speed-up | pairs: weights GB/s, GFLOP/s |")
    print("|---|---|---|---|---|")
    for m in rows:
        a, d = (statistics.median(times[(m, n)]) for n in ("pairs", "onednn"))
        lo_a, lo_d = (min(times[(m, n)]) for n in ("pairs", "onednn"))
        print(
            f"| {m} | {a * 1e3:.1f} ms ({lo_a * 1e3:.1f}) | {d * 1e3:.1f} ms ({lo_d * 1e3:.1f}) | {d / a:.2f}x | "
            f"{weight_bytes / a / 1e9:.1f}, {m * weight_bytes / a / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
