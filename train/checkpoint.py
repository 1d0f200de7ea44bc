"""Atomic checkpoints with keep-last-k, and finding the one to resume from.

A checkpoint is a directory `checkpoints/step-000120/` written by `accelerator.save_state`
(model, optimizer, LR schedule, RNG states of every rank, and the registered EMA and data
sampler) plus `meta.json`. It is written under a temporary name and renamed into place only
when complete, and `checkpoints/latest` (a one-line file, replaced atomically) names it last:
a crash at any instant leaves `latest` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LATEST = "latest"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save(accelerator, root: str | Path, step: int, meta: dict, keep: int = 3) -> Path:
    """Save the full training state at `step`; all ranks call this (ZeRO shards save per rank)."""
    root = Path(root)
    final, tmp = _step_dir(root, step), root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    complete = [p for p in sorted(root.glob("step-*")) if (p / "meta.json").is_file()]
    return complete[-1] if complete else None


def load(accelerator, path: str | Path) -> dict:
    """Restore the full training state saved at `path`; returns its meta (step, ...)."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / "meta.json").read_text())
