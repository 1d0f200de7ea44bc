"""`ministack sample` (also `python -m model`): prompt and size -> mp4, gif and a PNG frame grid.

    ministack sample --pipeline runs/tiny/pipeline --prompt "a red square moving right" \\
        --frames 9 --height 32 --width 32 --steps 25 --guidance 4 --seed 0

Modes: text -> video (default), text -> image (--frames 1), image -> video (--image PATH),
extend a clip (--video PATH --extend forward|backward, --frames = the new total), and
video -> video (--video PATH --strength 0.6, SDEdit). Without --pipeline it samples a fresh,
untrained model (noise, with a warning): useful only to check the plumbing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.media import frame_grid, read_frames, to_tensor, write_image, write_video
from model.sizes import SizeRule


def guidance_interval(text: str) -> tuple[float, float]:
    """'LO,HI' with 0 <= LO <= HI <= 1 (argparse names the flag when this raises)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ministack sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pipeline", help="a saved pipeline directory (from training); default: untrained tiny")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument(
        "--guidance-interval",
        type=guidance_interval,
        default=(0.0, 1.0),
        metavar="LO,HI",
        help="apply guidance only at noise levels in [LO, HI] (0 = clean, 1 = pure noise; default 0,1: every step)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="samples of the prompt")
    p.add_argument("--image", help="first frame (image -> video)")
    p.add_argument("--video", help="input clip, for --extend or --strength")
    p.add_argument("--extend", choices=("forward", "backward"))
    p.add_argument("--strength", type=float, help="SDEdit: how much of the path to re-noise, in (0, 1]")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument(
        "--out",
        default="out/sample",
        help="output path stem: STEM.png (a row per sample, a column per frame) and STEM.mp4 + STEM.gif "
        "(with --num N > 1: STEM-0.mp4 ... STEM-{N-1}.gif)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_size(args: argparse.Namespace, rule: SizeRule, clip_frames: int | None) -> None:
    """Refuse, before anything loads, a size the pipeline cannot sample: the output size against
    its codec's compression times its DiT's patch (for SDEdit the output has the --video clip's
    frame count, `clip_frames`), and a clip to extend against the codec alone."""
    clip = ("the --video clip's frame count", "--height", "--width")
    if args.strength is not None and clip_frames is not None:
        rule.latent((clip_frames, args.height, args.width), clip)
    else:
        rule.latent((args.frames, args.height, args.width), ("--frames", "--height", "--width"))
    if args.extend and clip_frames is not None:
        SizeRule(rule.compression).latent((clip_frames, args.height, args.width), clip)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.pipeline import MiniStackPipeline

    try:
        rule = (
            MiniStackPipeline.saved_size_rule(args.pipeline) if args.pipeline else MiniStackPipeline.build_size_rule()
        )
        clip = read_frames(args.video) if args.video else None  # uint8 [T, H, W, 3]
        check_size(args, rule, None if clip is None else len(clip))
        size, media = (args.height, args.width), {}
        if args.image:
            media["image"] = to_tensor(read_frames(args.image)[:1], size)[:, 0][None]
        if clip is not None:
            media["video"] = to_tensor(clip, size)[None]
        if torch.device(args.device).type == "cpu":  # the request is valid: now size the thread team
            from profiling.threads import apply_thread_policy

            apply_thread_policy()  # the cores other work leaves free, said on stderr
        if args.pipeline:
            pipe = MiniStackPipeline.from_pretrained(args.pipeline)
        else:
            print("warning: no --pipeline given: sampling an UNTRAINED model (the output is noise)", file=sys.stderr)
            pipe = MiniStackPipeline.build()
        pipe.to(args.device)
        out = pipe(
            [args.prompt] * args.num,
            negative_prompt=args.negative_prompt,
            frames=args.frames,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            guidance_interval=args.guidance_interval,
            generator=torch.Generator().manual_seed(args.seed),
            extend=args.extend,
            strength=args.strength,
            **media,
        )
    except (ValueError, FileNotFoundError) as err:
        flag = "--pipeline " if args.pipeline and str(err).startswith(str(args.pipeline)) else ""
        print(f"ministack sample: error: {flag}{err}", file=sys.stderr)
        return 2
    stem = Path(args.out)
    written = [write_image(stem.with_suffix(".png"), frame_grid(out.videos))]
    for i, video in enumerate(out.videos):
        name = stem if args.num == 1 else stem.with_name(f"{stem.name}-{i}")
        written += [
            write_video(name.with_suffix(".mp4"), video, args.fps),
            write_video(name.with_suffix(".gif"), video, args.fps),
        ]
    print("\n".join(str(p) for p in written))
    return 0
