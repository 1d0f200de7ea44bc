"""Training MFU of a DiT config on this device, against two peaks measured in the same run.

For each step: FLOPs counted from the ops that ran (profiling.measure, once per shape),
checked against the exact formula; wall time of real AdamW steps; MFU against (a) the
device's dense table peak (GPUs) and (b) the matmul peak measured here, in this process,
for the same dtype (a peer run beside it: large square matmuls, the best this device does).

    python bench/dit_mfu.py --config tiny --latent 5,16,16 --batch 16 --dtype fp32,bf16   # CPU, both dtypes
    python bench/dit_mfu.py --config dit-xl-2 --latent 1,32,32 --batch 64 --dtype bf16     # GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.configs import load_config
from model.dit import DiT
from model.flops.formula import dit_flops
from profiling.hardware import accelerator, auto_dtype, normalize_dtype
from profiling.measure import count_flops, forward_backward


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best FLOP/s of square matmuls on `device` (the ceiling a model's matmuls can reach)."""
    best = 0.0
    for n in (1024, 2048, 4096, 8192) if device == "cuda" else (512, 1024, 2048):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        warm = time.perf_counter()
        a @ b
        _sync(device)
        if time.perf_counter() - warm > seconds:  # a slow dtype here (bf16 on a CPU without bf16 units): enough
            return max(best, 2 * n**3 / (time.perf_counter() - warm))
        reps, start = 0, time.perf_counter()
        _sync(device)
        while time.perf_counter() - start < seconds / 4:
            a @ b
            reps += 1
            if device == "cuda" and reps % 10 == 0:
                _sync(device)
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--latent", default="8,16,16", help="latent T,H,W")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument(
        "--dtype", default=None, help="fp32, bf16 or both: fp32,bf16 (default: bf16 on GPU, this CPU's preferred dtype)"
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from profiling.cpu import prepare_cpu

        prepare_cpu()
    dtypes = args.dtype.split(",") if args.dtype else [auto_dtype(device)]
    for dtype in dtypes:
        result = bench(
            args.config,
            tuple(int(v) for v in args.latent.split(",")),
            args.batch,
            args.text_len,
            normalize_dtype(dtype),
            device,
            args.steps,
        )
        print(json.dumps(result, indent=1) if args.json else report(result))


def bench(
    config: str, latent: tuple[int, int, int], b: int, text_len: int, dtype_name: str, device: str, steps: int
) -> dict:
    """One config, shape and dtype: counted FLOPs, timed AdamW steps, both peaks."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = load_config(config)
    text_len = text_len if cfg.text_dim else 0
    torch.manual_seed(0)
    model = DiT.from_dit_config(cfg).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def batch() -> tuple[tuple, dict]:
        kw = {"y": torch.zeros(b, dtype=torch.long, device=device)} if cfg.num_classes else {}
        if cfg.text_dim:
            kw["context"] = torch.randn(b, text_len, cfg.text_dim, device=device)
        return (torch.randn(b, cfg.in_channels, *latent, device=device), torch.rand(b, device=device)), kw

    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    args_, kw = batch()
    count_start = time.perf_counter()
    with autocast:
        counted = count_flops(forward_backward(model, *args_, **kw), model.flop_parts, fake=True)
    count_s = time.perf_counter() - count_start  # paid once per distinct shape (FlopMeter caches)
    exact = sum(dit_flops(cfg, b, *latent, text_len=text_len, backward=True).values())

    def step() -> None:
        a, k = batch()
        with autocast:
            loss = (model(*a, **k).float()[:, : cfg.in_channels] - a[0]).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    step_s = (time.perf_counter() - start) / steps

    achieved = counted.total / step_s
    peak_measured = matmul_peak(device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    table = accelerator(name).peak(dtype_name) if device == "cuda" else float("nan")
    return {
        "device": name,
        "dtype": dtype_name,
        "config": config,
        "batch": b,
        "latent": latent,
        "tokens_per_step": b * cfg.num_tokens(*latent),
        "measured_flops_per_step": counted.total,
        "exact_flops_per_step": exact,
        "count_s": count_s,
        "step_s": step_s,
        "achieved_flops_per_s": achieved,
        "matmul_peak_measured": peak_measured,
        "table_peak": table,
        "mfu_vs_measured_matmul": achieved / peak_measured,
        "mfu_vs_table": achieved / table,
        "matmul_peak_vs_table": peak_measured / table,
    }


def report(r: dict) -> str:
    lines = [
        f"device {r['device']}  dtype {r['dtype']}  config {r['config']}  batch {r['batch']}  latent {r['latent']}",
        f"FLOPs/step measured {r['measured_flops_per_step']:.4e}  exact {r['exact_flops_per_step']:.4e}  "
        f"(ratio {r['measured_flops_per_step'] / r['exact_flops_per_step']:.4f})",
        f"step {r['step_s'] * 1e3:.1f} ms  ->  {r['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s achieved  "
        f"(counting this shape took {r['count_s']:.2f} s, once)",
        f"matmul peak measured here {r['matmul_peak_measured'] / 1e12:.3f} TFLOP/s  ->  MFU {r['mfu_vs_measured_matmul']:.1%}",
    ]
    if r["device"] != "cpu":
        lines.append(
            f"table dense peak {r['table_peak'] / 1e12:.1f} TFLOP/s  ->  MFU {r['mfu_vs_table']:.1%}  "
            f"(matmul reaches {r['matmul_peak_vs_table']:.1%} of it)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
