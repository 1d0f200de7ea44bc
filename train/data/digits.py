"""Moving handwritten digits: real digit scans bouncing around a black frame, in the style of Moving MNIST.

The scans are scikit-learn's `load_digits()`: 1,797 real 8x8 grey scans (17 levels) of handwritten
0-9, shipped inside the scikit-learn wheel, so nothing is downloaded. Unlike the procedural
shapes, the strokes are real handwriting, yet every clip is still made on the fly and is a pure
function of (seed, index) (train.data.glyphs: the motion, rendering and attributes shared with
the moving Fashion-MNIST items). The data has no end and no clip is stored.

Held-out scans: a fixed 15 % of the scans (spread evenly over each digit's scans, in their
order in the data set) are the validation scans; `split="train"` draws only from the others and
`split="val"` only from them, so a validation loss cannot come from memorised handwriting.
The split depends on the scans' order alone, not on any shuffling that a library release
could change, so validation sets stay the same across scikit-learn versions.

Rendering (train.data.glyphs.render): the scan, padded with one blank pixel each side, is
stretched bilinearly over a square box of side 0.4-0.6 x the frame's shorter side. Bilinear
rather than nearest: the scans are already low-pass (each pixel counts the inked pixels of a 4x4
block of a 32x32 bitmap), so bilinear gives smooth strokes instead of 8x8 blocks. In frames too
small for the scan (a 16x16 frame's digit box is 6-10 px) each pixel averages several samples
(antialiasing). Ink 0..16 maps to [-1, 1] (black background at -1), replicated to RGB.
`two_digit_fraction` of the clips hold a second digit (combined by maximum; 0 by default).

Attributes: those of train.data.glyphs with the items under `digits`; the caption names each
digit ("the digit 3 moving up and to the left").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from train.data import glyphs
from train.data.glyphs import DEFAULT_FPS, DEFAULT_SIZES, SPLITS, MovingGlyphs, track  # noqa: F401  (this module's API)
from train.data.procedural import _pick

VAL_FRACTION = 0.15
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


def _subject(label: int, rng: np.random.Generator | None) -> str:
    return _pick(rng, SUBJECTS).format(d=label, word=NUMBER_WORDS[label])


def caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """Describe `attrs` in words; with no RNG the canonical prompt ("the digit 3 moving up and to
    the left"). Reads `frames` and per digit `label`, `motion` and (optionally) `bouncing`."""
    return glyphs.caption(attrs, rng, _subject, "digits", VIDEO_PREFIXES, IMAGE_PREFIXES)


def render(attrs: dict) -> torch.Tensor:
    """The clip the attributes describe: [3, T, H, W] float32 in [-1, 1], digits combined by their
    maximum (train.data.glyphs.render over the scans)."""
    return glyphs.render(attrs, scans()[0], "digits")


class MovingDigits(MovingGlyphs):
    """`size` clips drawn from `seed` and the scans of `split`; index i is always the same clip.

    Each clip's (T, H, W) is one of `sizes` (the loader passes the run's buckets), so no clip is
    cropped or resized to fit a bucket, which could cut a digit off."""

    key, name = "digits", "digits"

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        sizes: tuple[tuple[int, int, int], ...] = DEFAULT_SIZES,
        fps: tuple[float, ...] = DEFAULT_FPS,
        two_digit_fraction: float = 0.0,  # of clips: two digits instead of one
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: one of {SPLITS}")
        images, labels = scans()
        super().__init__(
            size,
            seed,
            split,
            sizes,
            fps,
            two_digit_fraction,
            images=images,
            labels=labels,
            pool=split_scans(labels)[SPLITS.index(split)],
        )

    @property
    def two_digit_fraction(self) -> float:
        return self.two_fraction

    caption = staticmethod(caption)  # the module's caption and renderer
    render = staticmethod(render)
