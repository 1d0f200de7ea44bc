"""`ministack train CONFIG` (also `python -m train CONFIG`).

Single process:      ministack train configs/train/tiny.yaml
Several GPUs / DDP:  accelerate launch --config_file configs/accelerate/ddp.yaml -m train configs/train/tiny.yaml
DeepSpeed ZeRO-2:    accelerate launch --config_file configs/accelerate/zero2.yaml -m train configs/train/tiny.yaml
Override any field:  --set max_steps=200 --set data.batch_size=4
A run resumes from its newest complete checkpoint in RUN_DIR/checkpoints automatically.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ministack train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="run YAML (default: the built-in tiny run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    from profiling.cpu import prepare_cpu

    prepare_cpu()
    from train.config import load_train_config
    from train.loop import train

    try:
        cfg = load_train_config(args.config, args.set)
    except (ValueError, OSError) as err:
        print(f"ministack train: error: {err}", file=sys.stderr)
        return 2
    result = train(cfg)
    print(f"trained {result['step']} steps; run in {result['run']}")
    return 0
