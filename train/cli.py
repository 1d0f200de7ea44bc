"""`ministack train CONFIG` (also `python -m train CONFIG`).

Stages (each optional; the DiT stage builds a missing latent cache itself):
  ministack train vae CONFIG     train the video VAE -> RUN_DIR/codec (then set codec: RUN_DIR/codec)
  ministack train cache CONFIG   encode the data once into the latent cache (CONFIG's latent_cache)
  ministack train CONFIG         train the DiT (on the latent cache when latent_cache is set)
  ministack train evaluate CONFIG   evaluate the run's saved pipeline again (e.g. --set eval_prompts=160
                                    --set eval_guidance=2): scores, samples and RUN_DIR/eval.jsonl as at the end of training

Single process:      ministack train configs/train/tiny.yaml
Several GPUs / DDP:  accelerate launch --config_file configs/accelerate/ddp.yaml -m train configs/train/tiny.yaml
DeepSpeed ZeRO-2:    accelerate launch --config_file configs/accelerate/zero2.yaml -m train configs/train/tiny.yaml
Override any field:  --set max_steps=200 --set data.batch_size=4
On SLURM:            ministack train configs/train/tiny.yaml --slurm [--dry-run] --set slurm.nodes=2 --set slurm.gpus_per_node=8
A run resumes from its newest complete checkpoint in RUN_DIR/checkpoints automatically.
"""

from __future__ import annotations

import argparse
import sys

STAGES = ("vae", "cache", "dit", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="ministack train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stage = "dit"
    if argv and argv[0] in STAGES:
        stage, argv = argv[0], argv[1:]
    p.add_argument("config", nargs="?", help="run YAML (default: the built-in tiny run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--slurm", action="store_true", help="submit the run as a SLURM job (the config's slurm: section)")
    p.add_argument(
        "--dry-run", action="store_true", help="with --slurm: write and print the batch script, submit nothing"
    )
    args = p.parse_args(argv)
    if args.dry_run and not args.slurm:
        p.error("--dry-run goes with --slurm")
    if args.slurm and stage != "dit":
        p.error(f"--slurm submits the DiT stage; run `ministack train {stage}` inside a job of your own")
    from profiling.cpu import prepare_cpu

    prepare_cpu()
    from train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.set, stage)
        if stage == "cache" and not cfg.latent_cache:
            raise ValueError("the config sets no latent_cache directory (--set latent_cache=DIR)")
        if stage == "evaluate":
            from train.evaluate import saved_pipeline

            saved_pipeline(cfg)  # refused here, before anything loads, when the run saved none
        if stage == "dit" and cfg.compile:
            import torch

            from train.speed import check_compile

            check_compile("cuda" if torch.cuda.is_available() else "cpu")
    except (ValueError, OSError) as err:
        print(f"ministack train: error: {err}", file=sys.stderr)
        return 2
    if args.slurm:
        return _submit(cfg, args)
    from train.faults import RunError

    try:
        _run_stage(stage, cfg)
    except RunError as err:  # a failure the user acts on (train/faults.py): its message, no traceback
        print(f"ministack train: error: {err}", file=sys.stderr)
        return 1
    return 0


def _run_stage(stage: str, cfg) -> None:
    import torch

    if stage != "dit" and not torch.cuda.is_available():  # the DiT stage sizes (and re-sizes) its own (train.loop)
        from profiling.threads import apply_thread_policy

        apply_thread_policy()
    if stage == "vae":
        from train.vae import train_vae

        train_vae(cfg)
    elif stage == "cache":
        from train.data.latents import build_cache_for

        manifest = build_cache_for(cfg)
        print(f"latent cache {cfg.latent_cache}: {manifest['clips']} clips, {manifest['skipped']} skipped")
    elif stage == "evaluate":
        from train.evaluate import evaluate_saved, format_eval

        print(format_eval(evaluate_saved(cfg)))
    else:
        from train.loop import train

        train(cfg)  # prints "trained N steps" once, from the main process


def _submit(cfg, args: argparse.Namespace) -> int:
    """Write RUN_DIR/slurm/train.sbatch for this config and its overrides; submit it unless --dry-run."""
    from pathlib import Path

    from train.slurm import submit

    if not args.config:
        print("ministack train: error: --slurm needs a run YAML (the job reads it)", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run_dir).resolve()
    overrides = [f"run_dir={run_dir}"] + [o for o in args.set if not o.startswith(("slurm.", "run_dir="))]
    try:
        script, job = submit(cfg.slurm, run_dir, Path(args.config).resolve(), overrides, sys.executable, args.dry_run)
    except (ValueError, RuntimeError) as err:
        print(f"ministack train: error: {err}", file=sys.stderr)
        return 2
    if job is None:
        print(script.read_text())
        print(f"batch script written to {script} (not submitted: --dry-run)", file=sys.stderr)
        return 0
    print(
        f"submitted SLURM job {job}: log {run_dir}/slurm/{job}.out, ledger {run_dir}/ledger.jsonl, "
        f"checkpoints {run_dir}/checkpoints; script {script}"
    )
    return 0
