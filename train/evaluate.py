"""Evaluation during training: the number scaling fits use, and whether samples match prompts.

- Validation loss at fixed timesteps and fixed noise on a fixed held-out batch: it must not move
  with the sampling of t, or loss curves of different runs could not be compared or fitted.
- Text alignment: sample the (EMA) model for prompts built from chosen attributes, recover
  colour / motion / shape from the pixels with the probe, and score against the prompt, beside
  the score that chance would get on the same prompts. For data.kind=digits the prompts name a
  digit and a direction ("the digit 3 moving left") and only the motion is scored.
- The held-out clips come from the run's data kind: for digits, clips of the validation scans
  only (never seen in training); for the other kinds, procedural clips of another seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.diffusion import TRAIN_STEPS, per_sample_noise, training_loss
from train.data import digits
from train.data.procedural import ProceduralVideos, caption
from train.probe import alignment_score

VAL_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def validation_losses(model, codec, text_encoder, clips: list, kind: str, seed: int = 0, batch: int = 64) -> np.ndarray:
    """Each clip's loss, shape [len(clips)], averaged over VAL_TIMESTEPS with fixed per-clip noise
    (clips of one shape, `batch` at a time). Their mean is the validation loss, their standard
    deviation / sqrt(n) its standard error."""
    per_clip = []
    for start in range(0, len(clips), batch):
        chunk = clips[start:start + batch]
        latents = codec.encode(torch.stack([c.video for c in chunk]).to(codec.shift.device))
        kwargs = {}
        if text_encoder is not None:
            context, mask = text_encoder([c.caption for c in chunk], pad_to_max_length=True)
            kwargs = {"context": context, "context_mask": mask}
        seeds = [seed * 100_003 + i for i in range(start, start + len(chunk))]
        _, noise = per_sample_noise(latents.shape, kind, seeds, latents.device)
        losses = []
        for t in VAL_TIMESTEPS:
            timestep = torch.full((len(chunk),), t * 1.0 if kind == "flow" else min(t, TRAIN_STEPS - 1), device=latents.device)
            losses.append(training_loss(model, latents, kind, timestep=timestep, noise=noise, per_sample=True, **kwargs))
        per_clip.append(torch.stack(losses).mean(0).cpu())
    return torch.cat(per_clip).numpy().astype(np.float64)


def validation_loss(model, codec, text_encoder, clips: list, kind: str, seed: int = 0) -> float:
    """Mean loss over `clips` (one shape) at each of VAL_TIMESTEPS, with per-clip fixed noise."""
    return float(validation_losses(model, codec, text_encoder, clips, kind, seed).mean())


def alignment_prompts(n: int, frames: int, seed: int = 0, data_kind: str = "procedural") -> list[dict]:
    """n attribute sets spread over colours, shapes and the four main directions (for digits:
    over the ten digits and the four directions, stating only the motion for the probe)."""
    rng = np.random.default_rng(seed)
    motions = ("left", "right", "up", "down") if frames > 1 else ("static",)
    if data_kind == "digits":
        picks = [(int(rng.integers(10)), str(rng.choice(motions))) for _ in range(n)]
        return [{"motion": m, "frames": frames, "digits": [{"label": d, "motion": m}]} for d, m in picks]
    colours, shapes = ("red", "green", "blue", "yellow", "white", "magenta", "cyan"), ("square", "circle", "triangle", "bar")
    return [{"colour": str(rng.choice(colours)), "shape": str(rng.choice(shapes)), "motion": str(rng.choice(motions)),
             "frames": frames} for _ in range(n)]


@torch.no_grad()
def text_alignment(pipeline, n: int = 8, frames: int = 5, height: int = 32, width: int = 32, steps: int = 20,
                   seed: int = 0, grid_path: str | Path | None = None, data_kind: str = "procedural") -> dict:
    """Sample prompts built from attributes, probe the videos, score them (with chance levels)."""
    from model.media import frame_grid, write_image

    attrs = alignment_prompts(n, frames, seed, data_kind)
    prompts = [(digits.caption if data_kind == "digits" else caption)(a) for a in attrs]
    out = pipeline(prompts, frames=frames, height=height, width=width, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(seed))
    if grid_path is not None:
        write_image(grid_path, frame_grid(out.videos))
    result = alignment_score(list(out.videos), attrs)
    return {k: result[k] for k in ("score", "score_chance", "accuracy", "chance", "n")} | {"prompts": prompts}


def held_out_set(data, n: int, frames: int, height: int, width: int):
    """n validation clips of one size, drawn with another seed (data.seed + 1): for data.kind=digits
    from the validation scans only, for the other kinds procedural clips."""
    if data.kind == "digits":
        return digits.MovingDigits(n, seed=data.seed + 1, split="val", sizes=((frames, height, width),))
    return ProceduralVideos(n, seed=data.seed + 1, resolutions=((height, width),), frames=(frames,))


def evaluate_run(pipeline, cfg, step: int, run: Path) -> dict:
    """Both measures for a run's EMA pipeline at `step`, on `cfg.val_clips` held-out clips
    (`held_out_set`) of the run's largest multi-frame bucket (validation loss with its standard
    error); appended to RUN/eval.jsonl, grid at RUN/samples/. Digits are scored on motion, so
    a run of digit images only gets no alignment score."""
    import json

    from train.data.buckets import parse_bucket

    buckets = [parse_bucket(b) for b in cfg.data.buckets]
    frames, height, width = max(buckets, key=lambda b: (b[0] > 1, b[1] * b[2]))
    held_out = held_out_set(cfg.data, cfg.val_clips, frames, height, width)
    clips = [held_out[i] for i in range(len(held_out))]
    losses = validation_losses(pipeline.transformer, pipeline.codec, pipeline.text_encoder, clips, cfg.diffusion)
    se = float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else float("nan")
    result = {"step": step, "val_loss": float(losses.mean()), "val_loss_se": se, "val_clips": len(losses)}
    if pipeline.text_encoder is not None and not (cfg.data.kind == "digits" and frames == 1):
        result |= text_alignment(pipeline, n=cfg.eval_prompts, frames=frames, height=height, width=width,
                                 steps=cfg.eval_sampling_steps, grid_path=run / "samples" / f"step-{step:07d}.png",
                                 data_kind=cfg.data.kind)
    with (run / "eval.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result
