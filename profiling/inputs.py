"""The planner's inputs: numbers with suffixes, sample shapes, and the tokens a dataset comes to.

Numbers take suffixes: 175e9, 7B, 135M, 2T, 10k. A dataset of images and/or videos becomes
tokens through its resolution, the latent encoder's compression and the patch size
(tokens_per_sample). `ministack flops estimate` and `ministack flops count` parse their flags here.
"""

from __future__ import annotations

import argparse
import math

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}  # B (billion) for counts, G (giga) for rates


class InputError(argparse.ArgumentTypeError, ValueError):
    """A malformed value. argparse prints an ArgumentTypeError's message verbatim (a plain
    ValueError becomes "invalid <function> value"); Python callers can catch ValueError."""


def parse_number(text: str) -> float:
    """'175e9', '1.5e12', '7B', '135M', '2T', '10k', '400G' -> a positive finite float."""
    text = str(text).strip()
    scale = _SUFFIX.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"expected a positive number like 175e9, 1.5e12, 7B or 10k, got {text!r}")
    return value


def parse_count(text: str) -> int:
    """parse_number for whole counts (GPUs, tokens, layers): '8k' -> 8000; '0.5' is an error."""
    value = parse_number(text)
    if abs(value - round(value)) > 1e-9 * value:  # 1.1k = 1100.0000000000002 is whole
        raise InputError(f"expected a whole number like 64, 8k or 7B, got {text!r}")
    return round(value)


def parse_count_or_zero(text: str) -> int:
    """parse_count that also takes 0 (a prefill-only request: scoring, embeddings, prompt logprobs)."""
    return 0 if str(text).strip() == "0" else parse_count(text)


def _positive_ints(text: str, sep: str, lengths: tuple[int, ...], expected: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.lower().split(sep))
    except ValueError:
        values = ()
    if len(values) not in lengths or min(values) < 1:
        raise InputError(f"expected {expected}, got {text!r}")
    return values


def parse_resolution(text: str) -> tuple[int, int]:
    """'256x256' -> (height, width) in pixels."""
    return _positive_ints(text, "x", (2,), "a resolution HxW like 256x256")  # type: ignore[return-value]


def parse_patch(text: str) -> tuple[int, int, int]:
    """'2' -> (1, 2, 2): a single P patches space only; 'pt,ph,pw' sets all three."""
    values = _positive_ints(text, ",", (1, 3), "a patch size P or pt,ph,pw like 2 or 1,2,2")
    return (1, values[0], values[0]) if len(values) == 1 else values  # type: ignore[return-value]


def parse_compression(text: str) -> tuple[int, int, int]:
    """'4,8,8' -> (t, h, w): how many frames/pixels one latent element stands for per axis."""
    return _positive_ints(text, ",", (3,), "a latent compression t,h,w like 4,8,8")  # type: ignore[return-value]


def tokens_per_sample(
    frames: int,
    height: int,
    width: int,
    patch: tuple[int, int, int] = (1, 1, 1),
    compression: tuple[int, int, int] = (1, 1, 1),
) -> int:
    """Tokens one sample becomes: ceil(T/ct/pt) · ceil(H/ch/ph) · ceil(W/cw/pw).

    Each axis is compressed by the latent encoder, then cut into patches. Sizes that do not
    divide are rounded up (ceil division), because patch embedders pad the remainder rather
    than drop it; ceil(ceil(a/c)/p) == ceil(a/(c·p)), so one division per axis is exact.
    An image is a one-frame sample: ceil(H/ch/ph)·ceil(W/cw/pw), H·W/P² when uncompressed.
    Causal video VAEs that keep the first frame apart (1 + (T-1)/ct) can differ by one latent frame.
    """
    sizes = (frames, height, width)
    return math.prod(-(-size // (c * p)) for size, c, p in zip(sizes, compression, patch))


def dataset_tokens(
    resolution: tuple[int, int],
    patch: tuple[int, int, int],
    compression: tuple[int, int, int] = (1, 1, 1),
    images: float | None = None,
    videos: float | None = None,
    frames: int = 1,
) -> dict:
    """Tokens in one pass over `images` and `videos` of one resolution, with the per-sample
    counts behind the total so a planner can check them."""
    h, w = resolution
    out: dict = {
        "resolution": f"{h}x{w}",
        "patch": list(patch),
        "latent_compression": list(compression),
        "images": images,
        "videos": videos,
        "frames": None if videos is None else frames,
        "tokens_per_epoch": 0,
    }
    for kind, count, length in (("image", images, 1), ("video", videos, frames)):
        if count is not None:
            out[f"tokens_per_{kind}"] = tokens_per_sample(length, h, w, patch, compression)
            out["tokens_per_epoch"] += count * out[f"tokens_per_{kind}"]
    return out
