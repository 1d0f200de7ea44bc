"""`ministack train CONFIG` (also `python -m train CONFIG`).

Stages (each optional; the DiT stage builds a missing latent cache itself):
  ministack train vae CONFIG     train the video VAE -> RUN_DIR/codec (then set codec: RUN_DIR/codec)
  ministack train cache CONFIG   encode the data once into the latent cache (CONFIG's latent_cache)
  ministack train CONFIG         train the DiT (on the latent cache when latent_cache is set)

Single process:      ministack train configs/train/tiny.yaml
Several GPUs / DDP:  accelerate launch --config_file configs/accelerate/ddp.yaml -m train configs/train/tiny.yaml
DeepSpeed ZeRO-2:    accelerate launch --config_file configs/accelerate/zero2.yaml -m train configs/train/tiny.yaml
Override any field:  --set max_steps=200 --set data.batch_size=4
A run resumes from its newest complete checkpoint in RUN_DIR/checkpoints automatically.
"""

from __future__ import annotations

import argparse
import sys

STAGES = ("vae", "cache", "dit")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="ministack train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage = "dit"
    if argv and argv[0] in STAGES:
        stage, argv = argv[0], argv[1:]
    p.add_argument("config", nargs="?", help="run YAML (default: the built-in tiny run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    from profiling.cpu import prepare_cpu

    prepare_cpu()
    from train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.set, stage)
        if stage == "cache" and not cfg.latent_cache:
            raise ValueError("the config sets no latent_cache directory (--set latent_cache=DIR)")
    except (ValueError, OSError) as err:
        print(f"ministack train: error: {err}", file=sys.stderr)
        return 2
    if stage == "vae":
        from train.vae import train_vae

        train_vae(cfg)
    elif stage == "cache":
        from train.data.latents import build_cache_for

        manifest = build_cache_for(cfg)
        print(f"latent cache {cfg.latent_cache}: {manifest['clips']} clips, {manifest['skipped']} skipped")
    else:
        from train.loop import train

        train(cfg)  # prints "trained N steps" once, from the main process
    return 0
