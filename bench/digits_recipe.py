"""One recipe lever at a time on the moving digits, fast: the same DiT, loss, EMA and judge as a
`ministack train` run, without the run's machinery.

`bench/recipe_ablation.py` runs each arm as a full `ministack train` (latent cache, checkpoints,
ledger, report): the figures a user reproduces with a config. This script answers the earlier
question, which levers are worth such a run, in a fraction of the time: it renders the clips once
(cached under /tmp, keyed by their sizes and count), keeps their MiniLM states in memory, and
runs the training step alone (model.diffusion.training_loss, fused AdamW, grad clip 1, EMA),
alternating a video batch and an image batch as the bucketed loader does for two equal buckets.
At each --eval-at step it samples --prompts prompts (10 digits x 8 directions) from the EMA
weights and prints what train.judge reads (class and motion accuracy, the Frechet distance
beside its real-vs-real floor, the judge's own accuracy on held-out real clips); the sample
sheet goes to --out.

    python bench/digits_recipe.py --steps 1500 --eval-at 500,1000 --hidden 128 --depth 4 --heads 4 \\
        --video-batch 8 --image-batch 32 --lr 1.5e-3 --sigma-shift 3
    python bench/digits_recipe.py ... --class-labels       # a label embedding instead of the caption
    python bench/digits_recipe.py ... --canonical           # train on the canonical wording only
    python bench/digits_recipe.py ... --guidance 4,1,2,7 --sampling-steps 20,10,50   # sampler rows at the end
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.diffusion import MIN_SIGMA, TRAIN_STEPS, flow_sigmas, make_scheduler, training_loss  # noqa: E402
from model.dit import DiT, DiTConfig  # noqa: E402
from model.media import contact_sheet, write_image  # noqa: E402
from model.pipeline import MiniStackPipeline  # noqa: E402
from model.text_encoder import TextEncoder  # noqa: E402
from model.vae import load_codec  # noqa: E402
from train import judge as judges  # noqa: E402
from train.data.digits import MovingDigits  # noqa: E402
from train.data.digits import caption as canonical_caption  # noqa: E402
from train.ema import EMA  # noqa: E402
from train.schedule import lr_lambda  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-at", default="", help="comma-separated steps to evaluate at (the last step always)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--size", type=int, default=32, help="frame height and width")
    p.add_argument("--clips", type=int, default=4000, help="rendered clips per bucket (videos, images)")
    p.add_argument("--video-batch", type=int, default=8)
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=("cosine", "constant"),
        help="cosine: warm-up then cosine to zero at --steps, as `ministack train` does",
    )
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--cond-drop", type=float, default=0.1)
    p.add_argument("--sigma-sampling", default="logit_normal", choices=("logit_normal", "uniform"))
    p.add_argument("--sigma-shift", type=float, default=1.0)
    p.add_argument("--target", default="native", choices=("native", "data"))
    p.add_argument(
        "--loss-space",
        default="velocity",
        choices=("velocity", "data"),
        help="the loss on the velocity (unweighted) or on the clean frame (sigma^2-weighted): needs --target data",
    )
    p.add_argument("--norm", default="layer", choices=("layer", "rms"), help="the blocks' and final layer's norm")
    p.add_argument("--no-pooled-text", action="store_true")
    p.add_argument("--qk-norm", action="store_true", help="RMSNorm on each head's queries and keys")
    p.add_argument("--positions", default="sincos", choices=("sincos", "rope"))
    p.add_argument("--attention", default="full", choices=("full", "factorized"))
    p.add_argument("--class-labels", action="store_true", help="condition on the digit's label, not the caption")
    p.add_argument("--canonical", action="store_true", help="train on the canonical caption wording only")
    p.add_argument(
        "--guidance", default="4", help="classifier-free guidance scale; a comma list: each is read at the last step"
    )
    p.add_argument(
        "--sampling-steps", default="20", help="Euler steps of the sampler; a comma list: each is read at the last step"
    )
    p.add_argument("--prompts", type=int, default=80)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--out", default="/tmp/digits-recipe", help="sample sheets and the JSON lines of each evaluation")
    args = p.parse_args()
    if args.loss_space == "data" and args.target != "data":
        p.error("--loss-space data weights a clean-frame prediction's loss: it needs --target data")
    return args


def render(args: argparse.Namespace, encoder: TextEncoder) -> dict:
    """{frames: (grey clips [N, T, H, W] fp16, caption states, masks, labels)} for the video and
    the image bucket, plus the empty caption's states; cached on disk."""
    path = Path(f"/tmp/digits-recipe-{args.frames}x{args.size}-{args.clips}-{int(args.canonical)}.pt")
    if path.is_file():
        return torch.load(path)
    data = {}
    for frames, seed in ((args.frames, 0), (1, 1)):
        clips = MovingDigits(args.clips, seed=seed, sizes=((frames, args.size, args.size),))
        items = [clips[i] for i in range(len(clips))]
        captions = [canonical_caption(c.attrs) if args.canonical else c.caption for c in items]
        states, masks = zip(
            *(encoder(captions[s : s + 256], pad_to_max_length=True) for s in range(0, len(captions), 256))
        )
        data[frames] = (
            torch.stack([c.video[0] for c in items]).half(),
            torch.cat(states).half(),
            torch.cat(masks),
            torch.tensor([c.attrs["label"] for c in items]),
        )
    data["null"] = tuple(encoder([""], pad_to_max_length=True))
    torch.save(data, path)
    return data


def build_model(args: argparse.Namespace, text_dim: int) -> DiT:
    model = DiT.from_dit_config(
        DiTConfig(
            in_channels=3,
            patch_size=(1, args.patch, args.patch),
            hidden_size=args.hidden,
            depth=args.depth,
            num_heads=args.heads,
            text_dim=0 if args.class_labels else text_dim,
            num_classes=10 if args.class_labels else 0,
            pooled_text=not (args.no_pooled_text or args.class_labels),
            target=args.target,
            qk_norm=args.qk_norm,
            positions=args.positions,
            attention=args.attention,
        )
    )
    if args.norm == "rms":  # the lever tried here only: the model keeps LayerNorm unless RMSNorm wins
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.LayerNorm):
                    setattr(
                        module, name, torch.nn.RMSNorm(child.normalized_shape, eps=child.eps, elementwise_affine=False)
                    )
    return model


def loss_weights(timestep: torch.Tensor, space: str) -> torch.Tensor:
    """Per-sample weights of the velocity-space loss. A clean-frame prediction's velocity error
    is its clean-frame error over sigma, so weighting by sigma^2 (sigma clipped as the model's
    velocity clips it) is the loss on the clean frame itself (the x-loss Li & He compare)."""
    if space == "velocity":
        return torch.ones_like(timestep)
    return (timestep / TRAIN_STEPS).clamp(min=MIN_SIGMA).square()


def batch(data: dict, frames: int, n: int, args: argparse.Namespace, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """n random clips of one bucket as RGB, and the model's conditioning (cond_drop of it emptied)."""
    grey, states, masks, labels = data[frames]
    idx = torch.randint(0, len(grey), (n,), generator=g)
    drop = torch.rand(n, generator=g) < args.cond_drop
    x = grey[idx].float()[:, None].expand(-1, 3, -1, -1, -1).contiguous()
    if args.class_labels:
        return x, {"y": torch.where(drop, 10, labels[idx])}
    context, mask = states[idx].float(), masks[idx].clone()
    context[drop], mask[drop] = data["null"][0].float(), data["null"][1]
    return x, {"context": context, "context_mask": mask}


@torch.no_grad()
def evaluate(
    model: DiT,
    ema: EMA,
    encoder: TextEncoder,
    judge: judges.Judge,
    args: argparse.Namespace,
    step: int,
    guidance: float,
    sampling_steps: int,
) -> dict:
    sampler = copy.deepcopy(model).eval()
    ema.copy_to(sampler)
    pipe = MiniStackPipeline(
        sampler, make_scheduler("flow"), load_codec("identity"), None if args.class_labels else encoder
    )
    pipe.set_progress_bar_config(disable=True)
    attrs = judges.prompt_attrs("digits", args.prompts, args.frames, 0)
    prompts = [judges.caption("digits", a) for a in attrs]
    generator, videos = torch.Generator().manual_seed(0), []
    for s in range(0, len(prompts), 40):
        labels = {"class_labels": [a["label"] for a in attrs[s : s + 40]]} if args.class_labels else {}
        videos.append(
            pipe(
                prompts[s : s + 40],
                frames=args.frames,
                height=args.size,
                width=args.size,
                generator=generator,
                num_inference_steps=sampling_steps,
                guidance_scale=guidance,
                **labels,
            ).videos
        )
    videos = np.concatenate(videos)
    write_image(Path(args.out) / f"step-{step:06d}-g{guidance:g}-s{sampling_steps}.png", contact_sheet(videos))
    reading = judges.read(judge.classifier, torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    scored = judges.score(reading, attrs)
    fd, floor = judge.frechet(reading.features)
    return {
        "step": step,
        **{k: round(a.value, 4) for k, a in scored.items()},
        **{f"{k}_95": [round(x, 3) for x in a.interval] for k, a in scored.items()},
        "fd": round(fd, 2),
        "fd_floor": round(floor, 2),
        "judge": {k: a.value for k, a in judge.validity.items()},
    }


def sampler_settings(args: argparse.Namespace) -> list[tuple[float, int]]:
    """(guidance, sampling steps) pairs: the first of each list, then every other value of one
    list beside the first of the other (one lever at a time)."""
    scales, steps = [float(g) for g in args.guidance.split(",")], [int(n) for n in args.sampling_steps.split(",")]
    return [(scales[0], steps[0])] + [(g, steps[0]) for g in scales[1:]] + [(scales[0], n) for n in steps[1:]]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    encoder = TextEncoder(None)
    data = render(args, encoder)
    judge = judges.make_judge("digits", (args.frames, args.size, args.size), log=lambda *_: None)
    model = build_model(args, encoder.dim)
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    decay = (
        lr_lambda(args.warmup, args.steps)
        if args.schedule == "cosine"
        else lambda s: min(1.0, (s + 1) / max(1, args.warmup))
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    g = torch.Generator().manual_seed(0)
    evals = {int(s) for s in args.eval_at.split(",") if s} | {args.steps}
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; " + json.dumps(vars(args)), flush=True)
    train_s, losses = 0.0, []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        x, cond = batch(
            data, 1 if step % 2 == 0 else args.frames, args.image_batch if step % 2 == 0 else args.video_batch, args, g
        )
        timestep = flow_sigmas(len(x), g, args.sigma_sampling, args.sigma_shift) * TRAIN_STEPS
        per_sample = training_loss(
            model, x, "flow", timestep=timestep, noise=torch.randn(x.shape, generator=g), per_sample=True, **cond
        )
        loss = (per_sample * loss_weights(timestep, args.loss_space)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        train_s += time.perf_counter() - start
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {np.mean(losses[-100:]):.4f} ({train_s / step:.2f} s/step)", flush=True)
        if step in evals:
            settings = sampler_settings(args)
            for guidance, sampling_steps in settings if step == args.steps else settings[:1]:
                result = evaluate(model, ema, encoder, judge, args, step, guidance, sampling_steps)
                result |= {"guidance": guidance, "sampling_steps": sampling_steps, "train_s": round(train_s)}
                print(json.dumps(result), flush=True)
                with (Path(args.out) / "results.jsonl").open("a") as f:
                    f.write(json.dumps(result | {"args": vars(args)}) + "\n")


if __name__ == "__main__":
    main()
