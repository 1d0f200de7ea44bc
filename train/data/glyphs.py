"""Moving glyphs: items of a labelled grey image set bouncing around a black frame, in the style
of Moving MNIST. The generic part of the moving digits (train.data.digits) and the moving
Fashion-MNIST items (train.data.fashion): motion, track, rendering, attributes and captions'
structure; each source gives only its images, labels and words.

Every clip is made on the fly and is a pure function of (seed, index): numpy
default_rng([seed, i]) draws (T, H, W) first (so `size_of` answers a bucketing sampler without
drawing anything else), then the fps, how many items (one, or two with `two_fraction`), per item
the image, size, direction, speed and start, then the caption's wording. The data has no end and
no clip is stored. A split draws only from its pool of images (the source keeps validation
images out of the training pool).

Rendering: the image (ink in [0, 1], with a blank border pixel each side) is stretched over a
square box of side 0.4-0.6 x the frame's shorter side and sampled bilinearly (scipy's
map_coordinates, order 1) at every frame's box position: smooth strokes rather than blocks, and
sub-pixel positions, so an item moving 0.7 px per frame glides instead of jumping a pixel at a
time. In frames too small for the image each pixel averages several samples (antialiasing). The
blank border makes the ink fall to 0 inside the box, and the box stays one pixel clear of the
frame's border, which stays background (the probe fits the background there). Ink 0..1 maps to
[-1, 1] (black background at -1), the procedural clips' value range, replicated to RGB; two items
are combined by their maximum.

Motion follows the procedural data's conventions (so `train.probe` can score it): one of the
8 compass directions at constant speed, the box bouncing off the edges; a bouncing item reaches
its first edge no earlier than halfway (its caption's direction is the one it starts in), and a
1-frame clip (an image) is static.

Attributes of a clip: frames, height, width, fps, split; under the source's key ("digits",
"items") one dict per item: scan (index into the source's images), label, side, bounds, motion,
bouncing, velocity, start; `label` (the single item's class, None for two items) and, for one
item, `motion` (the probe's ground truth).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.ndimage import map_coordinates

from train.data.clip import GeneratedClips
from train.data.procedural import DIRECTION_WORDS, DIRECTIONS, VERBS, _pick

SPLITS = ("train", "val")
DEFAULT_SIZES = ((1, 32, 32), (9, 32, 32), (1, 64, 64), (17, 64, 64))
DEFAULT_FPS = (8.0, 12.0, 16.0, 24.0)

# label, rng (None: the canonical wording) -> the item in words, e.g. "the digit 3", "a sneaker"
Subject = Callable[[int, "np.random.Generator | None"], str]


def caption(
    attrs: dict,
    rng: np.random.Generator | None,
    subject: Subject,
    key: str = "items",
    video_prefixes: tuple[str, ...] = ("",),
    image_prefixes: tuple[str, ...] = ("",),
) -> str:
    """Describe `attrs` in words; with no RNG the canonical prompt (first wording of each choice).
    Per item of `attrs[key]`: its subject, then (in a video, if it moves) a verb, its direction and
    ", bouncing off the edges" where it bounces; items joined by " and ", after a prefix. Reads
    `frames` and per item `label`, `motion` and (optionally) `bouncing`."""
    video = attrs.get("frames", 2) > 1
    parts = []
    for item in attrs[key]:
        text = subject(item["label"], rng)
        if video and item.get("motion", "static") != "static":
            text += f" {_pick(rng, VERBS)} {_pick(rng, DIRECTION_WORDS[item['motion']])}"
            text += ", bouncing off the edges" if item.get("bouncing") else ""
        parts.append(text)
    return _pick(rng, video_prefixes if video else image_prefixes) + " and ".join(parts)


def track(item: dict, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame top-left corner (y, x, pixels) of the item's box: a straight path folded back
    into the box's range [lo, hi] at each edge (a bounce)."""
    t = np.arange(frames, dtype=np.float64)
    out = []
    for p0, v, (lo, hi) in zip(item["start"], item["velocity"], item["bounds"]):
        span, p = hi - lo, p0 - lo + v * t
        out.append(lo + span - np.abs(span - np.mod(p, 2 * span)))
    return out[0], out[1]


def render(attrs: dict, images: np.ndarray, key: str = "items") -> torch.Tensor:
    """The clip the attributes describe: [3, T, H, W] float32 in [-1, 1], items combined by their
    maximum. `images` [N, S, S] (what each item's `scan` indexes): float ink in [0, 1], or uint8
    ink 0..255 (made float per item, so a large image set stays small in memory). Where the box
    is smaller than the image (small frames), each frame pixel averages ceil(image pixels per
    frame pixel)^2 bilinear samples, so strokes do not alias away. Only the pixels of a window
    around each frame's box are sampled (all others are exactly 0): the cost follows the box's
    area, not the frame's."""
    t, h, w = attrs["frames"], attrs["height"], attrs["width"]
    ink = np.zeros((t, h, w), np.float32)
    frame = np.arange(t)[:, None, None]
    for item in attrs[key]:
        image = images[item["scan"]]
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255
        top, left = track(item, t)
        k = images.shape[1] / item["side"]  # image pixels per frame pixel
        s = int(np.ceil(k - 1e-9))  # samples per frame pixel and axis
        # a sample can be nonzero only within half an image pixel (0.5 / k frame pixels) of the box
        windows = []
        for corner, n in ((top, h), (left, w)):
            m = min(n, int(np.ceil(item["side"] + 1 / k)) + 3)  # window side, pixels
            first = np.clip(np.floor(corner - 0.5 / k).astype(np.int64) - 1, 0, n - m)  # per frame
            windows.append(first[:, None] + np.arange(m))
        rows, cols = windows
        y, x = ((np.repeat(p * s, s, axis=1) + np.tile(np.arange(s), p.shape[1])).astype(np.float64) for p in windows)
        y, x = (y + 0.5) / s, (x + 0.5) / s  # sample points, s per pixel and axis
        u = np.broadcast_to(((y - top[:, None]) * k - 0.5)[:, :, None], (t, y.shape[1], x.shape[1]))
        v = np.broadcast_to(((x - left[:, None]) * k - 0.5)[:, None, :], (t, y.shape[1], x.shape[1]))
        sample = map_coordinates(image, [u, v], order=1, mode="grid-constant", cval=0.0)
        patch = sample.reshape(t, rows.shape[1], s, cols.shape[1], s).mean((2, 4)).astype(np.float32)
        ink[frame, rows[:, :, None], cols[:, None, :]] = np.maximum(
            ink[frame, rows[:, :, None], cols[:, None, :]], patch
        )
    grey = np.clip(ink, 0, 1) * 2 - 1
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(grey[None], (3, t, h, w))))


class MovingGlyphs(GeneratedClips):
    """`size` clips drawn from `seed` over `images` (those of `pool`: indices into images, all by
    default); index i is always the same clip. Each clip's (T, H, W) is one of `sizes` (the loader
    passes the run's buckets), so no clip is cropped or resized to fit a bucket, which could cut
    an item off. A source subclasses it, giving its images, labels and `caption(attrs, rng)`;
    `key` names the attribute holding the items, `name` prefixes each clip's source
    ("<name>:<split>:<index>")."""

    key = "items"
    name = "glyphs"

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        sizes: tuple[tuple[int, int, int], ...] = DEFAULT_SIZES,
        fps: tuple[float, ...] = DEFAULT_FPS,
        two_fraction: float = 0.0,  # of clips: two items instead of one
        *,
        images: np.ndarray,
        labels: np.ndarray,
        pool: np.ndarray | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: one of {SPLITS}")
        if images.ndim != 3 or images.shape[1] != images.shape[2] or len(images) != len(labels):
            raise ValueError(
                f"images must be [N, S, S] with one label each, got {images.shape} and {len(labels)} labels"
            )
        self.n, self.seed, self.split, self.sizes, self.fps = size, seed, split, tuple(map(tuple, sizes)), fps
        self.two_fraction = two_fraction
        self.images, self.labels = images, labels
        self.pool = np.arange(len(labels)) if pool is None else pool  # the images this split may draw
        if len(self.pool) == 0:
            raise ValueError(f"{self.name}: no images in split {split!r}")
        self.source = f"{self.name}:{split}"

    def caption(self, attrs: dict, rng: np.random.Generator | None = None) -> str:
        raise NotImplementedError

    def _dims(self, rng: np.random.Generator) -> tuple[int, int, int]:
        t, h, w = self.sizes[int(rng.integers(len(self.sizes)))]
        return int(t), int(h), int(w)

    def size_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of clip i, without rendering it (for bucketing samplers)."""
        return self._dims(np.random.default_rng([self.seed, i]))

    def _item(self, rng: np.random.Generator, t: int, h: int, w: int) -> dict:
        """One item: image, box side, bounds of its top-left corner, direction, velocity and start."""
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
        return dict(
            scan=scan,
            label=int(self.labels[scan]),
            side=side,
            bounds=bounds,
            motion=motion,
            bouncing=bool(bouncing),
            velocity=[s * travel / max(t - 1, 1) for s in d],
            start=start,
        )

    def describe(self, i: int) -> tuple[dict, str]:
        """Attributes and caption of clip i, without rendering it (any i >= 0, also past len)."""
        rng = np.random.default_rng([self.seed, i])
        t, h, w = self._dims(rng)
        attrs = dict(frames=t, height=h, width=w, fps=float(_pick(rng, self.fps)), split=self.split)
        count = 2 if rng.random() < self.two_fraction else 1
        items = attrs[self.key] = [self._item(rng, t, h, w) for _ in range(count)]
        attrs["label"] = items[0]["label"] if count == 1 else None
        if count == 1:  # the probe's ground truth (train.probe reads one object)
            attrs["motion"] = items[0]["motion"]
        return attrs, self.caption(attrs, rng)

    def render(self, attrs: dict) -> torch.Tensor:
        """The clip the attributes describe (module `render` over this set's images)."""
        return render(attrs, self.images, self.key)
