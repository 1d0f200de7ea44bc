"""The pieces of one optimizer step that every rank runs alike: which samples drop their caption,
a batch encoded to latents and text states, a batch empty on some rank skipped by all, and the
update that ends an accumulation window (clipped, and skipped or stopped when not finite)."""

from __future__ import annotations

import math
import random

import torch
from accelerate.utils import DistributedType

from train.config import TrainConfig
from train.faults import NonfiniteGuard
from train.meter import StepWindow


def any_rank_empty(accelerator, batch: dict) -> bool:
    """Whether any rank's batch came out empty (all its clips failed to decode after the scan).
    All ranks must skip such a step together: a rank that skipped alone would leave the others
    waiting in the gradient all-reduce until the collective timeout."""
    empty = not batch["captions"]
    if accelerator.num_processes == 1:
        return empty
    flag = torch.tensor([float(empty)], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def dropped_captions(seeds: list[int], rate: float) -> list[bool]:
    """Which samples train unconditioned (caption ""), from each sample's own seed: the same
    samples whatever the batch split across ranks, and again after a resume."""
    return [rate > 0 and random.Random(seed).random() < rate for seed in seeds]


@torch.no_grad()
def encode_batch(batch: dict, codec, text_encoder, null, drop: list[bool], device):
    """(video or None, latents, context, mask) of a batch of clips (encoded here by the frozen
    codec and text encoder) or of cached latents (`null`: the cached empty caption's embedding)."""
    if "latents" in batch:
        latents, context, mask = batch["latents"].to(device), batch["context"], batch["context_mask"]
        if context is not None:
            context, mask = context.to(device), mask.to(device)
            if any(drop):
                rows = torch.tensor(drop, device=device)
                context = torch.where(rows[:, None, None], null[0], context)
                mask = torch.where(rows[:, None], null[1], mask)
        return None, latents, context, mask
    video = batch["video"].to(device)
    captions = ["" if d else c for c, d in zip(batch["captions"], drop)]
    context, mask = text_encoder(captions, pad_to_max_length=True) if text_encoder else (None, None)
    return video, codec.encode(video), context, mask


def nonfinite_policy(cfg: TrainConfig, accelerator) -> str:
    """The policy for non-finite steps this run can honour. Under DeepSpeed the engine applies the
    update inside backward, before the loop sees the gradient norm: a bad step cannot be skipped
    there, only stopped after (its weights are never checkpointed), so "skip" becomes "stop", said
    once at the start."""
    if cfg.nonfinite == "skip" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.print(
            "nonfinite=skip: under DeepSpeed the engine updates the weights inside backward, before the "
            "gradient norm is known, so a non-finite step stops the run instead (as nonfinite=stop)"
        )
        return "stop"
    return cfg.nonfinite


def apply_update(
    accelerator, model, optimizer, scheduler, grad_clip: float, guard: NonfiniteGuard, window: StepWindow, step: int
) -> float | None:
    """The optimizer step that ends an accumulation window: clip, check the window's loss and the
    gradient norm are finite on every rank, then step the optimizer and the LR schedule. Returns the
    LR the step used, or None when the guard skipped it (no update at all); RunError when the guard
    stops the run."""
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # DeepSpeed: the engine's norm
    loss = torch.stack(window.losses).sum().float()
    finite = bool(torch.isfinite(loss)) and (norm is None or bool(torch.isfinite(torch.as_tensor(norm))))
    if accelerator.num_processes > 1:  # every rank takes the same decision
        finite = accelerator.reduce(torch.tensor([float(not finite)], device=accelerator.device), "sum").item() == 0
    detail = (
        f"loss {loss.item() / len(window.losses)} / gradient norm {None if norm is None else float(norm)} "
        f"(rank {accelerator.process_index}) on the batch of sources {window.sources} (noise seeds {window.seeds})"
    )
    if guard.skip(step, finite, detail):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    lr = scheduler.get_last_lr()[0]  # the LR this step used; stepping the schedule moves it on
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr
