"""Moving handwritten digits: real digit scans bouncing around a black frame, in the style of Moving MNIST.

The scans are scikit-learn's `load_digits()`: 1,797 real 8x8 grey scans (17 levels) of handwritten
0-9, shipped inside the scikit-learn wheel, so nothing is downloaded. Unlike the procedural
shapes, the strokes are real handwriting, yet every clip is still made on the fly and is a pure
function of (seed, index): numpy default_rng([seed, i]) draws (T, H, W) first (so `size_of`
answers a bucketing sampler without drawing anything else), then the scan, size, direction,
speed and start, then the caption's wording. The data has no end and no clip is stored.

Held-out scans: a fixed 15 % of the scans (spread evenly over each digit's scans, in their
order in the data set) are the validation scans; `split="train"` draws only from the others and
`split="val"` only from them, so a validation loss cannot come from memorised handwriting.
The split depends on the scans' order alone, not on any shuffling that a library release
could change, so validation sets stay the same across scikit-learn versions.

Rendering: the scan, padded with one blank pixel each side, is stretched over a square box of
side 0.4-0.6 x the frame's shorter side and sampled bilinearly (scipy's map_coordinates, order 1)
at every frame's box position. Bilinear rather than nearest: the scans are already low-pass
(each pixel counts the inked pixels of a 4x4 block of a 32x32 bitmap), so bilinear gives smooth
strokes instead of 8x8 blocks, and it renders sub-pixel positions, so a digit moving 0.7 px per
frame glides instead of jumping a whole pixel at a time. In frames too small for the scan (a
16x16 frame's digit box is 6-10 px) each pixel averages several samples (antialiasing). The
padding makes the ink fall to 0 inside the box, and the box stays one pixel clear of the
border, which stays background (the probe fits the background there). Ink 0..16 maps to
[-1, 1] (black background at -1), the same value range as the procedural clips, replicated to
RGB. `two_digit_fraction` of the clips hold a second digit (combined by maximum; 0 by default).

Motion follows the procedural data's conventions (so `train.probe` can score it): one of the
8 compass directions at constant speed, the box bouncing off the edges; a bouncing digit
reaches its first edge no earlier than halfway (its caption's direction is the one it starts
in), and a 1-frame clip (an image) is static.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import map_coordinates

from train.data.clip import GeneratedClips
from train.data.procedural import DIRECTION_WORDS, DIRECTIONS, VERBS, _pick

VAL_FRACTION = 0.15
SPLITS = ("train", "val")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUBJECTS = ("the digit {d}", "a handwritten {d}", "the number {word}", "a handwritten digit {d}")
VIDEO_PREFIXES, IMAGE_PREFIXES = ("", "", "a video of "), ("", "", "an image of ", "a picture of ")


@lru_cache(maxsize=1)
def scans() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans as float32 ink in [0, 1], padded to [N, 10, 10] with blank pixels, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.pad(data.images.astype(np.float32) / 16, ((0, 0), (1, 1), (1, 1)))
    return images, data.target.astype(np.int64)


def split_scans(labels: np.ndarray, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) scan indices: per digit, the scans whose rank r among that digit's scans
    crosses a multiple of 1 / val_fraction (floor((r + 1) f) > floor(r f)) are validation scans,
    so each digit keeps floor(n f) of its n scans for validation, evenly spread."""
    rank = np.zeros(len(labels), np.int64)
    for digit in np.unique(labels):
        rank[labels == digit] = np.arange(int((labels == digit).sum()))
    val = np.floor((rank + 1) * val_fraction) > np.floor(rank * val_fraction)
    return np.flatnonzero(~val), np.flatnonzero(val)


def caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """Describe `attrs` in words; with no RNG the canonical prompt ("the digit 3 moving up and to
    the left"). Reads `frames` and per digit `label`, `motion` and (optionally) `bouncing`."""
    video = attrs.get("frames", 2) > 1
    parts = []
    for digit in attrs["digits"]:
        text = _pick(rng, SUBJECTS).format(d=digit["label"], word=NUMBER_WORDS[digit["label"]])
        if video and digit.get("motion", "static") != "static":
            text += f" {_pick(rng, VERBS)} {_pick(rng, DIRECTION_WORDS[digit['motion']])}"
            text += ", bouncing off the edges" if digit.get("bouncing") else ""
        parts.append(text)
    return _pick(rng, VIDEO_PREFIXES if video else IMAGE_PREFIXES) + " and ".join(parts)


def track(digit: dict, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame top-left corner (y, x, pixels) of the digit's box: a straight path folded back
    into the box's range [lo, hi] at each edge (a bounce)."""
    t = np.arange(frames, dtype=np.float64)
    out = []
    for p0, v, (lo, hi) in zip(digit["start"], digit["velocity"], digit["bounds"]):
        span, p = hi - lo, p0 - lo + v * t
        out.append(lo + span - np.abs(span - np.mod(p, 2 * span)))
    return out[0], out[1]


def render(attrs: dict) -> torch.Tensor:
    """The clip the attributes describe: [3, T, H, W] float32 in [-1, 1], digits combined by their
    maximum. Where the box is smaller than the padded scan (small frames), each frame pixel
    averages ceil(scan pixels per frame pixel)^2 bilinear samples, so strokes do not alias away."""
    t, h, w = attrs["frames"], attrs["height"], attrs["width"]
    images = scans()[0]
    ink = np.zeros((t, h, w), np.float32)
    for digit in attrs["digits"]:
        top, left = track(digit, t)
        k = images.shape[1] / digit["side"]  # scan pixels per frame pixel
        s = int(np.ceil(k - 1e-9))  # samples per frame pixel and axis
        y, x = ((np.arange(n * s, dtype=np.float64)[None, :] + 0.5) / s for n in (h, w))  # sample points
        u = np.broadcast_to(((y - top[:, None]) * k - 0.5)[:, :, None], (t, h * s, w * s))
        v = np.broadcast_to(((x - left[:, None]) * k - 0.5)[:, None, :], (t, h * s, w * s))
        sample = map_coordinates(images[digit["scan"]], [u, v], order=1, mode="grid-constant", cval=0.0)
        ink = np.maximum(ink, sample.reshape(t, h, s, w, s).mean((2, 4)).astype(np.float32))
    grey = np.clip(ink, 0, 1) * 2 - 1
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(grey[None], (3, t, h, w))))


class MovingDigits(GeneratedClips):
    """`size` clips drawn from `seed` and the scans of `split`; index i is always the same clip.

    Each clip's (T, H, W) is one of `sizes` (the loader passes the run's buckets), so no clip is
    cropped or resized to fit a bucket, which could cut a digit off."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        sizes: tuple[tuple[int, int, int], ...] = ((1, 32, 32), (9, 32, 32), (1, 64, 64), (17, 64, 64)),
        fps: tuple[float, ...] = (8.0, 12.0, 16.0, 24.0),
        two_digit_fraction: float = 0.0,  # of clips: two digits instead of one
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: one of {SPLITS}")
        self.n, self.seed, self.split, self.sizes, self.fps = size, seed, split, tuple(map(tuple, sizes)), fps
        self.two_digit_fraction = two_digit_fraction
        self.labels = scans()[1]
        self.pool = split_scans(self.labels)[SPLITS.index(split)]  # the scans this split may draw
        self.source = f"digits:{split}"

    def _dims(self, rng: np.random.Generator) -> tuple[int, int, int]:
        t, h, w = self.sizes[int(rng.integers(len(self.sizes)))]
        return int(t), int(h), int(w)

    def size_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of clip i, without rendering it (for bucketing samplers)."""
        return self._dims(np.random.default_rng([self.seed, i]))

    def _digit(self, rng: np.random.Generator, t: int, h: int, w: int) -> dict:
        """One digit: scan, box side, bounds of its top-left corner, direction, velocity and start."""
        scan = int(self.pool[int(rng.integers(len(self.pool)))])
        side = float(rng.uniform(0.4, 0.6) * min(h, w))
        bounds = [(1.0, n - 1.0 - side) for n in (h, w)]  # the box stays one pixel clear of the border
        motion = "static" if t == 1 else _pick(rng, tuple(DIRECTIONS))
        d = DIRECTIONS.get(motion, (0, 0))
        room = min(hi - lo for (lo, hi), s in zip(bounds, d) if s) if any(d) else 0.0
        travel = room * rng.uniform(0.4, 1.2)  # over the clip; past room, it bounces once
        start = []
        for (lo, hi), s in zip(bounds, d):
            if s == 0:
                start.append(float(rng.uniform(lo, hi)))
            else:  # the wall ahead is at least half the travel away: the first bounce comes after halfway
                gap = rng.uniform(travel / 2, hi - lo)
                start.append(float(hi - gap if s > 0 else lo + gap))
        bouncing = any(s and (hi - p if s > 0 else p - lo) < travel for (lo, hi), s, p in zip(bounds, d, start))
        return dict(scan=scan, label=int(self.labels[scan]), side=side, bounds=bounds, motion=motion, bouncing=bool(bouncing),
                    velocity=[s * travel / max(t - 1, 1) for s in d], start=start)

    def describe(self, i: int) -> tuple[dict, str]:
        """Attributes and caption of clip i, without rendering it (any i >= 0, also past len)."""
        rng = np.random.default_rng([self.seed, i])
        t, h, w = self._dims(rng)
        attrs = dict(frames=t, height=h, width=w, fps=float(_pick(rng, self.fps)), split=self.split)
        count = 2 if rng.random() < self.two_digit_fraction else 1
        attrs["digits"] = [self._digit(rng, t, h, w) for _ in range(count)]
        if count == 1:  # the probe's ground truth (train.probe reads one object)
            attrs["motion"] = attrs["digits"][0]["motion"]
        return attrs, caption(attrs, rng)

    render = staticmethod(render)  # the module's renderer: a clip from its attributes
