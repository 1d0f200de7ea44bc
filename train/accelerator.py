"""The run's Accelerator: its precision, its process group and DeepSpeed, and ZeRO-3's
parameters gathered whole where a step needs them so."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from profiling.hardware import auto_dtype
from train.config import TrainConfig


def mixed_precision(setting: str, cuda: bool) -> str:
    """accelerate's mixed_precision for a config's setting: "auto" is bf16 where it pays (GPUs;
    CPUs whose bf16 matmul is safe and clearly faster than fp32: profiling.hardware.auto_dtype),
    else "no". An explicit "bf16" is honoured anywhere (prepare_cpu has made it safe)."""
    if setting not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {setting!r}")
    if setting != "auto":
        return setting
    return "bf16" if auto_dtype("cuda" if cuda else "cpu") == "bf16" else "no"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's precision (mixed_precision), gloo where there is no CUDA (DeepSpeed would
    otherwise ask for NCCL), and a short collective timeout so hangs fail fast. DeepSpeed comes
    from the accelerate config (`accelerate launch`) or from the run's own `deepspeed:` JSON
    (any launcher: torchrun reads no accelerate config); both at once is refused."""
    precision = mixed_precision(cfg.mixed_precision, torch.cuda.is_available())
    kwargs = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = {} if torch.cuda.is_available() else {"backend": "gloo"}
        kwargs.append(InitProcessGroupKwargs(timeout=timedelta(minutes=10), **backend))
    plugin = None
    if cfg.deepspeed:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise ValueError("deepspeed: the accelerate config already sets up DeepSpeed; give one of the two")
        plugin = DeepSpeedPlugin(hf_ds_config=str(Path(cfg.deepspeed).resolve()))
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        kwargs_handlers=kwargs,
        deepspeed_plugin=plugin,
    )


def gathered(model, deepspeed):
    """ZeRO-3 keeps 1/N of each parameter per rank: gather them whole (for the EMA) where needed."""
    if deepspeed is None or deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed as ds

    return ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
