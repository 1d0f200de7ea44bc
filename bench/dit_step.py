"""Training tokens/s of ministack's DiT against the reference DiT, in interleaved pairs.

The reference is diffusers' `DiTTransformer2DModel` (its port of facebookresearch/DiT's
models.py), built from a config with random weights (nothing downloaded), as DiT-S/2: hidden
384, depth 12, 6 heads, patch 2, 4 latent channels, 1000 classes, learned sigma (8 output
channels), eager, torch's AdamW. Ours is the `dit-s-2` preset through what `ministack train`
does: train.speed's AdamW (fused), the dtype `mixed_precision: auto` picks (bf16 autocast only
where this CPU's bf16 matmul measured >= 1.5x fp32, else fp32), eager and with `compile: true`
(torch.compile, inductor). Same latent, batch, flow-matching loss and class labels for both.

Each pair times every arm `--steps` times back to back (the arms' order alternates pair to pair);
a pair's ratio is ours tokens/s over the reference's from the same pair, so a shared machine's
drift cancels. Printed: per pair, the median and the worst pair's ratio, CPU-seconds per step
beside the wall time (on a core shared with other work the CPU time is the steadier figure), the
first compiled step's extra time and the steps it takes to pay back, and the floor a step cannot
beat: its matmul FLOPs (counted) at the matmul peak measured in this process.

    python bench/dit_step.py                                   # DiT-S/2, 32x32 latent, batch 8, 5 pairs
    python bench/dit_step.py --config configs/models/tiny-p4.yaml --latent 5,16,16 --batch 32 --no-reference
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.configs import load_config  # noqa: E402
from model.dit import DiT  # noqa: E402


class Arm:
    """One way of running a training step: `step()` runs it; tokens per step."""

    def __init__(self, name: str, step, tokens: int) -> None:
        self.name, self.step, self.tokens = name, step, tokens
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_s = 0.0

    def warm(self) -> None:
        t = time.perf_counter()
        self.step()
        self.first_s = time.perf_counter() - t

    def time(self, steps: int) -> None:
        wall, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            self.step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        self.wall.append(statistics.median(wall))
        self.cpu.append(statistics.median(cpu))


def flow_step(forward, params, optimizer, x0: torch.Tensor, autocast):
    """A flow-matching training step on `forward(xt, t)` (its first C output channels)."""

    def step() -> None:
        b = x0.shape[0]
        noise, t = torch.randn_like(x0), torch.rand(b)
        sigma = t.view(b, *[1] * (x0.dim() - 1))
        with autocast:
            out = forward((1 - sigma) * x0 + sigma * noise, t)
        loss = (out.float()[:, : x0.shape[1]] - (noise - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference_arm(batch: int, latent: tuple[int, int, int]) -> Arm:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=12,
        sample_size=latent[1],
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    labels = torch.randint(0, 1000, (batch,))
    x0 = torch.randn(batch, 4, *latent[1:])
    forward = lambda xt, t: model(xt, timestep=(t * 999).long(), class_labels=labels).sample  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Arm(
        "reference",
        flow_step(forward, list(model.parameters()), opt, x0, torch.autocast("cpu", enabled=False)),
        batch * (latent[1] // 2) * (latent[2] // 2),
    )


def ours_arm(config: str, batch: int, latent: tuple[int, int, int], dtype: str, compiled: bool) -> tuple[Arm, DiT]:
    from train.speed import adamw

    torch.manual_seed(0)
    cfg = load_config(config)
    model = DiT.from_dit_config(cfg)
    kwargs = {}
    if cfg.num_classes:
        kwargs["y"] = torch.randint(0, cfg.num_classes, (batch,))
    if cfg.text_dim:
        kwargs["context"] = torch.randn(batch, 32, cfg.text_dim)
        kwargs["context_mask"] = torch.ones(batch, 32, dtype=torch.bool)
    x0 = torch.randn(batch, cfg.in_channels, *latent)
    net = torch.compile(model) if compiled else model  # what train.loop does with compile: true
    forward = lambda xt, t: net(xt, t * 1000, **kwargs)  # noqa: E731
    opt = adamw(model.parameters(), 1e-4, 0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    name = f"ministack {'compiled' if compiled else 'eager'} {dtype}"
    return Arm(
        name, flow_step(forward, list(model.parameters()), opt, x0, autocast), batch * cfg.num_tokens(*latent)
    ), model


def matmul_floor(model: DiT, batch: int, latent: tuple[int, int, int], dtype: str) -> tuple[float, float]:
    """(matmul + attention FLOPs of one training step, counted on fake tensors; the matmul peak
    measured now, in this process, for `dtype`)."""
    from bench.dit_mfu import matmul_peak
    from profiling.measure import count_flops, forward_backward

    cfg = model.cfg
    kw = {"y": torch.zeros(batch, dtype=torch.long)} if cfg.num_classes else {}
    if cfg.text_dim:
        kw.update(context=torch.randn(batch, 32, cfg.text_dim), context_mask=torch.ones(batch, 32, dtype=torch.bool))
    counted = count_flops(
        forward_backward(model, torch.randn(batch, cfg.in_channels, *latent), torch.rand(batch), **kw),
        model.flop_parts,
        fake=True,
    )
    return counted.total, matmul_peak("cpu", {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], seconds=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="dit-s-2", help="our DiT: a preset or YAML (default dit-s-2)")
    p.add_argument("--latent", default="1,32,32", help="latent T,H,W (default 1,32,32: 256 tokens at patch 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per arm per pair (their median)")
    p.add_argument("--dtype", default="auto", help="ours: auto (train's mixed_precision: auto), fp32 or bf16")
    p.add_argument("--no-reference", action="store_true", help="ours eager vs compiled only (any config and shape)")
    p.add_argument("--no-compile", action="store_true", help="leave the compiled arm out")
    args = p.parse_args()
    latent = tuple(int(v) for v in args.latent.split(","))

    from profiling.cpu import _cpuinfo, prepare_cpu

    prepare_cpu()
    dtype = args.dtype
    if dtype == "auto":
        from train.accelerator import mixed_precision

        dtype = "bf16" if mixed_precision("auto", cuda=False) == "bf16" else "fp32"
    print(
        f"CPU {_cpuinfo()[0]}, {torch.get_num_threads()} threads, torch {torch.__version__}; ours {args.config} in {dtype}, "
        f"batch {args.batch}, latent {args.latent}",
        flush=True,
    )
    arms = [] if args.no_reference else [reference_arm(args.batch, latent)]
    eager, model = ours_arm(args.config, args.batch, latent, dtype, compiled=False)
    arms.append(eager)
    if not args.no_compile:
        arms.append(ours_arm(args.config, args.batch, latent, dtype, compiled=True)[0])
    for arm in arms:  # the compiled arm compiles here
        arm.warm()
        print(f"first step of {arm.name}: {arm.first_s:.1f} s", flush=True)
    base = arms[0]
    for i in range(args.pairs):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            arm.time(args.steps)
        print(
            f"pair {i + 1}: "
            + " | ".join(
                f"{a.name} {a.tokens / a.wall[-1]:.0f} tok/s ({a.wall[-1]:.2f} s, cpu {a.cpu[-1]:.2f} s)"
                + ("" if a is base else f" {(a.tokens / a.wall[-1]) / (base.tokens / base.wall[-1]):.2f}x")
                for a in arms
            ),
            flush=True,
        )
    print()
    for arm in arms[1:]:
        ratios = [(arm.tokens / w) / (base.tokens / b) for w, b in zip(arm.wall, base.wall)]
        cpu_ratios = [(arm.tokens / w) / (base.tokens / b) for w, b in zip(arm.cpu, base.cpu)]
        print(
            f"{arm.name} vs {base.name}: tokens/s ratio median {statistics.median(ratios):.2f}x, worst pair {min(ratios):.2f}x "
            f"(CPU-time ratio median {statistics.median(cpu_ratios):.2f}x, worst {min(cpu_ratios):.2f}x); "
            f"median {arm.tokens / statistics.median(arm.wall):.0f} vs {base.tokens / statistics.median(base.wall):.0f} tok/s"
        )
    if not args.no_compile:
        compiled = arms[-1]
        extra = compiled.first_s - statistics.median(eager.wall)
        saved = statistics.median(eager.wall) - statistics.median(compiled.wall)
        payback = f"pays back after {extra / saved:.0f} steps" if saved > 0 else "never pays back (no step saved)"
        print(
            f"compile: the first compiled step took {compiled.first_s:.1f} s ({extra:.1f} s over an eager step); "
            f"{saved * 1e3:.0f} ms saved per step: {payback}"
        )
    flops, peak = matmul_floor(model, args.batch, latent, dtype)
    floor = flops / peak
    line = f"floor: {flops:.3e} matmul+attention FLOPs per step at {peak / 1e9:.1f} GFLOP/s (measured now) = {floor:.2f} s/step"
    if not args.no_reference:
        wall, cpu = statistics.median(base.wall), statistics.median(base.cpu)
        line += (
            f"; the reference's median {wall:.2f} s/step (cpu {cpu:.2f} s): a step at the floor would be "
            f"{wall / floor:.2f}x it ({cpu / floor:.2f}x in CPU time)"
        )
    print(line)


if __name__ == "__main__":
    main()
