"""Evaluation during training: the number scaling fits use, and whether samples match prompts.

- Validation loss at fixed timesteps and fixed noise on a fixed held-out batch: it must not move
  with the sampling of t, or loss curves of different runs could not be compared or fitted.
- Text alignment: sample the (EMA) model for prompts built from chosen attributes and score what
  the samples show against what the prompts asked, beside chance. For the labelled glyph kinds
  (digits, fashion) the prompts name a class and one of 8 directions ("the digit 3 moving up and
  to the left") and train.judge reads them: a classifier trained on real data, validated on
  held-out real clips (printed beside every score), the centroid track for the motion, and a
  Frechet distance to real clips with its real-vs-real floor. For the procedural shapes the
  probe reads colour, motion and shape back (train.probe).
- The held-out clips come from the run's data kind: for digits and fashion, clips of the
  validation images only (never seen in training); for the other kinds, procedural clips of
  another seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.diffusion import TRAIN_STEPS, per_sample_noise, training_loss
from train import judge as judges
from train.data.procedural import ProceduralVideos, caption
from train.probe import alignment_score

VAL_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass(frozen=True)
class Sampler:
    """How the evaluation samples: Euler steps, the guidance scale and the noise levels it applies
    at (model.pipeline's guidance_interval)."""

    steps: int = 20
    guidance: float = 4.0
    interval: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def of(cls, cfg) -> Sampler:
        """The run config's eval_sampling_steps, eval_guidance and eval_guidance_interval."""
        return cls(cfg.eval_sampling_steps, cfg.eval_guidance, tuple(cfg.eval_guidance_interval))

    def record(self) -> dict:
        """Its fields for the eval log (the interval only where it is not every step)."""
        interval = {"guidance_interval": list(self.interval)} if self.interval != (0.0, 1.0) else {}
        return {"guidance": self.guidance, "sampling_steps": self.steps} | interval

    def suffix(self) -> str:
        """A file-name part that tells re-evaluations apart."""
        interval = f"-i{self.interval[0]:g}-{self.interval[1]:g}" if self.interval != (0.0, 1.0) else ""
        return f"-g{self.guidance:g}{interval}-s{self.steps}"


@torch.no_grad()
def validation_losses(model, codec, text_encoder, clips: list, kind: str, seed: int = 0, batch: int = 64) -> np.ndarray:
    """Each clip's loss, shape [len(clips)], averaged over VAL_TIMESTEPS with fixed per-clip noise
    (clips of one shape, `batch` at a time). Their mean is the validation loss, their standard
    deviation / sqrt(n) its standard error."""
    per_clip = []
    for start in range(0, len(clips), batch):
        chunk = clips[start : start + batch]
        latents = codec.encode(torch.stack([c.video for c in chunk]).to(codec.shift.device))
        kwargs = {}
        if text_encoder is not None:
            context, mask = text_encoder([c.caption for c in chunk], pad_to_max_length=True)
            kwargs = {"context": context, "context_mask": mask}
        seeds = [seed * 100_003 + i for i in range(start, start + len(chunk))]
        _, noise = per_sample_noise(latents.shape, kind, seeds, latents.device)
        losses = []
        for t in VAL_TIMESTEPS:
            timestep = torch.full(
                (len(chunk),), t * 1.0 if kind == "flow" else min(t, TRAIN_STEPS - 1), device=latents.device
            )
            losses.append(
                training_loss(model, latents, kind, timestep=timestep, noise=noise, per_sample=True, **kwargs)
            )
        per_clip.append(torch.stack(losses).mean(0).cpu())
    return torch.cat(per_clip).numpy().astype(np.float64)


def validation_loss(model, codec, text_encoder, clips: list, kind: str, seed: int = 0) -> float:
    """Mean loss over `clips` (one shape) at each of VAL_TIMESTEPS, with per-clip fixed noise."""
    return float(validation_losses(model, codec, text_encoder, clips, kind, seed).mean())


def alignment_prompts(n: int, frames: int, seed: int = 0, data_kind: str = "procedural") -> list[dict]:
    """n attribute sets spread over colours, shapes and the four main directions (for the glyph
    kinds: balanced over the ten classes and the eight directions, train.judge.prompt_attrs)."""
    if data_kind in judges.GLYPH_KINDS:
        return judges.prompt_attrs(data_kind, n, frames, seed)
    rng = np.random.default_rng(seed)
    motions = ("left", "right", "up", "down") if frames > 1 else ("static",)
    colours, shapes = (
        ("red", "green", "blue", "yellow", "white", "magenta", "cyan"),
        ("square", "circle", "triangle", "bar"),
    )
    return [
        {
            "colour": str(rng.choice(colours)),
            "shape": str(rng.choice(shapes)),
            "motion": str(rng.choice(motions)),
            "frames": frames,
        }
        for _ in range(n)
    ]


def _sample(
    pipeline,
    prompts: list[str],
    frames: int,
    height: int,
    width: int,
    sampler: Sampler,
    seed: int,
    grid_path: str | Path | None,
    batch: int = 16,
) -> np.ndarray:
    """The pipeline's videos for `prompts` ([n, T, H, W, 3] uint8, what a user gets; `batch`
    prompts at a time: a sampling step's memory grows with the batch); with `grid_path`, their
    contact sheet there (PNG: each clip's frames side by side) and beside it the clips as one
    tiled GIF (8 to a row), so a person sees both the frames and the motion."""
    from model.media import contact_sheet, tile_video, write_image, write_video

    generator = torch.Generator().manual_seed(seed)
    pipeline.set_progress_bar_config(disable=True)  # one bar per batch of prompts would bury the run's console
    videos = np.concatenate(
        [
            pipeline(
                prompts[s : s + batch],
                frames=frames,
                height=height,
                width=width,
                num_inference_steps=sampler.steps,
                guidance_scale=sampler.guidance,
                guidance_interval=sampler.interval,
                generator=generator,
            ).videos
            for s in range(0, len(prompts), batch)
        ]
    )
    if grid_path is not None:
        write_image(grid_path, contact_sheet(videos))
        write_video(Path(grid_path).with_suffix(".gif"), tile_video(videos), fps=4)
    return videos


@torch.no_grad()
def text_alignment(
    pipeline,
    n: int = 8,
    frames: int = 5,
    height: int = 32,
    width: int = 32,
    sampler: Sampler = Sampler(),
    seed: int = 0,
    grid_path: str | Path | None = None,
    data_kind: str = "procedural",
    source: str = "",
) -> dict:
    """Sample prompts built from attributes and score what the samples show against them, with
    chance levels: by train.judge for the glyph kinds (`glyph_alignment`), else by the probe."""
    if data_kind in judges.GLYPH_KINDS:
        judge = cached_judge(data_kind, (frames, height, width), source)
        return glyph_alignment(pipeline, judge, n, sampler, seed, grid_path)
    attrs = alignment_prompts(n, frames, seed, data_kind)
    prompts = [caption(a) for a in attrs]
    videos = _sample(pipeline, prompts, frames, height, width, sampler, seed, grid_path)
    result = alignment_score(list(videos), attrs)
    return {k: result[k] for k in ("score", "score_chance", "accuracy", "chance", "n")} | {"prompts": prompts}


_judges: dict[tuple, judges.Judge] = {}


def cached_judge(kind: str, size: tuple[int, int, int], source: str = "") -> judges.Judge:
    """One judge per (kind, clip size, source) in this process: its validation runs once a run."""
    key = (kind, size, source)
    if key not in _judges:
        _judges[key] = judges.make_judge(kind, size, source=source)
    return _judges[key]


def glyph_alignment(
    pipeline,
    judge: judges.Judge,
    n: int,
    sampler: Sampler = Sampler(),
    seed: int = 0,
    grid_path: str | Path | None = None,
) -> dict:
    """n prompts balanced over classes and directions, sampled and read by `judge`: accuracy per
    attribute with its 95 % interval and chance, the Frechet distance to real clips with its
    real-vs-real floor, and the judge's own accuracy on real clips (its validation)."""
    frames, height, width = judge.size
    attrs = judges.prompt_attrs(judge.kind, n, frames, seed)
    prompts = [judges.caption(judge.kind, a) for a in attrs]
    videos = _sample(pipeline, prompts, frames, height, width, sampler, seed, grid_path)
    reading = judges.read(judge.classifier, torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    scored = judges.score(reading, attrs)
    fd, floor = judge.frechet(reading.features)
    return {
        "accuracy": {k: a.value for k, a in scored.items()},
        "interval": {k: list(a.interval) for k, a in scored.items()},
        "chance": {k: a.chance for k, a in scored.items()},
        "n": {k: a.n for k, a in scored.items()},
        "fd": fd,
        "fd_floor": floor,
        "fd_frames": min(len(reading.features), len(judge.real_features)),
        "judge": {k: a.value for k, a in judge.validity.items()},
        "prompts": prompts,
    }


def held_out_set(data, n: int, frames: int, height: int, width: int):
    """n validation clips of one size, drawn with another seed (data.seed + 1): for the glyph kinds
    from the validation images only, for the other kinds procedural clips."""
    if data.kind in judges.GLYPH_KINDS:
        return judges.glyph_clips(data.kind, n, data.seed + 1, "val", (frames, height, width), data.source)
    return ProceduralVideos(n, seed=data.seed + 1, resolutions=((height, width),), frames=(frames,))


def evaluate_run(pipeline, cfg, step: int, run: Path, again: bool = False) -> dict:
    """Both measures for a run's EMA pipeline at `step`, on `cfg.val_clips` held-out clips
    (`held_out_set`) of the run's largest multi-frame bucket (validation loss with its standard
    error); appended to RUN/eval.jsonl, grid at RUN/samples/. `again`: a saved pipeline evaluated
    after its run (marked so in the record; its sheet named by its settings, training's kept)."""
    import json

    from train.data.buckets import parse_bucket

    buckets = [parse_bucket(b) for b in cfg.data.buckets]
    frames, height, width = max(buckets, key=lambda b: (b[0] > 1, b[1] * b[2]))
    held_out = held_out_set(cfg.data, cfg.val_clips, frames, height, width)
    clips = [held_out[i] for i in range(len(held_out))]
    losses = validation_losses(pipeline.transformer, pipeline.codec, pipeline.text_encoder, clips, cfg.diffusion)
    se = float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else float("nan")
    result = {"step": step, "val_loss": float(losses.mean()), "val_loss_se": se, "val_clips": len(losses)}
    result |= {"again": True} if again else {}
    sampler = Sampler.of(cfg)
    suffix = f"-again-n{cfg.eval_prompts}{sampler.suffix()}" if again else ""
    if pipeline.text_encoder is not None:
        result |= sampler.record()
        grid = run / "samples" / f"step-{step:07d}{suffix}.png"
        result |= text_alignment(
            pipeline,
            n=cfg.eval_prompts,
            frames=frames,
            height=height,
            width=width,
            sampler=sampler,
            grid_path=grid,
            data_kind=cfg.data.kind,
            source=cfg.data.source,
        )
        result["samples"] = str(grid)
    with (run / "eval.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def saved_pipeline(cfg) -> Path:
    """RUN_DIR/pipeline, the EMA pipeline a finished run saved; a ValueError naming it if absent."""
    path = Path(cfg.run_dir) / "pipeline"
    if not (path / "transformer").is_dir():
        raise ValueError(
            f"no saved pipeline in {path}: train the run first (ministack train CONFIG), "
            "or --set run_dir= to the run to evaluate"
        )
    return path


def evaluate_saved(cfg) -> dict:
    """The end-of-run evaluation of a finished run's saved pipeline, again: with more prompts or
    another guidance scale (cfg.eval_prompts, cfg.eval_guidance, ...). Labelled with the step of
    the run's last evaluation; appended to RUN_DIR/eval.jsonl, samples in RUN_DIR/samples."""
    import json

    import torch

    from model.pipeline import MiniStackPipeline

    run = Path(cfg.run_dir)
    pipeline = MiniStackPipeline.from_pretrained(saved_pipeline(cfg)).to("cuda" if torch.cuda.is_available() else "cpu")
    log = run / "eval.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return evaluate_run(pipeline, cfg, records[-1]["step"] if records else 0, run, again=True)


def format_eval(result: dict) -> str:
    """An evaluation in words: the validation loss with its standard error, then each scored
    attribute with its 95 % interval beside chance (never one blended score: a score that reads
    colour right and motion at chance would look half good), the Frechet distance beside its
    real-vs-real floor, the judge's own accuracy on real clips, and where the samples are."""
    again = " (the saved pipeline, evaluated again)" if result.get("again") else ""
    lines = [
        f"eval at step {result['step']}{again}: val_loss {result['val_loss']:.4f} +- {result['val_loss_se']:.4f} "
        f"({result['val_clips']} held-out clips)"
    ]
    for name, accuracy in result.get("accuracy", {}).items():
        interval = result.get("interval", {}).get(name)
        span = f" [{interval[0]:.0%}, {interval[1]:.0%}]" if interval else ""
        lines.append(
            f"  {name}: {accuracy:.1%}{span} of {result['n'][name]} samples (chance {result['chance'][name]:.1%})"
        )
    if "fd" in result:
        # below as many frames as the judge has features the covariances are singular: the distance
        # and its floor then measure the estimator more than the samples
        few = result.get("fd_frames", judges.FEATURES) < judges.FEATURES
        caveat = (
            f"; {result['fd_frames']} frames, fewer than the judge's {judges.FEATURES} features: not comparable"
            if few
            else ""
        )
        lines.append(
            f"  Frechet distance to real clips: {result['fd']:.2f} (real vs real: {result['fd_floor']:.2f}{caveat})"
        )
    if "judge" in result:
        lines.append("  judge on held-out real clips: " + ", ".join(f"{k} {v:.1%}" for k, v in result["judge"].items()))
    if "samples" in result:
        interval = (
            " over noise levels {:g}-{:g}".format(*result["guidance_interval"]) if "guidance_interval" in result else ""
        )
        how = (
            f" (guidance {result['guidance']:g}{interval}, {result['sampling_steps']} sampling steps)"
            if "guidance" in result
            else ""
        )
        lines.append(f"  samples: {result['samples']} and {Path(result['samples']).with_suffix('.gif')}{how}")
    return "\n".join(lines)


def to_board(board, result: dict) -> None:
    """An evaluation's numbers as TensorBoard scalars (eval/...) and its sample sheet as an image."""
    step = result["step"]
    board.add_scalar("eval/val_loss", result["val_loss"], step)
    for name, accuracy in result.get("accuracy", {}).items():
        board.add_scalar(f"eval/{name}_accuracy", accuracy, step)
    for key in ("fd", "fd_floor"):
        if key in result:
            board.add_scalar(f"eval/{key}", result[key], step)
    if "samples" in result and Path(result["samples"]).is_file():
        from model.media import read_frames

        board.add_image("eval/samples", read_frames(result["samples"])[0], step, dataformats="HWC")
    board.flush()
