"""Read a procedural clip's attributes back from its pixels, and score videos against prompts.

`probe` is deterministic geometry, no learning, so a generated sample can be scored against the
prompt it was asked for ("a blue circle moving up"): the fraction of colours, motions and shapes
the probe reads back is a text-alignment score, and `alignment_score` states it next to chance.

    background  a plane a + b*y + c*x per frame and channel, fitted to the frame's border pixels
                (plain colours and gradients exactly; a faint texture stays well under threshold)
    object      pixels farther from the background than half the frame's largest distance
    colour      mean of the object's core pixels (> 3/4 of that distance), nearest palette colour
    shape       per frame, then the median over frames (all rotation-invariant):
                  elongation sqrt(l1/l2) of the pixel covariance: a bar is ~3.6, the rest ~1;
                  compactness area / (pi * r_max^2), r_max the farthest pixel from the centroid
                  (+ half a pixel): disc 0.85, square 0.63, triangle 0.43 as rasterised;
                  spread 2*pi*(l1 + l2) / area: disc 1.00, square 1.05, triangle 1.21
    motion      least-squares velocity of the centroid over the first half of the clip (the
                dataset's convention: a bouncing object's first edge comes after halfway),
                quantised to the 8 compass directions; "static" when, kept up for the whole clip,
                it would travel less than a tenth of the frame's shorter side
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from train.data.procedural import COLOURS, MOTIONS, SHAPES

ATTRIBUTES = ("colour", "motion", "shape")
CLASSES = {"colour": tuple(COLOURS), "motion": MOTIONS, "shape": SHAPES}
# (compactness, spread) of the three round-ish shapes, medians over dataset clips; and their scales
PROTOTYPES = {"circle": (0.849, 1.0), "square": (0.623, 1.047), "triangle": (0.429, 1.207)}
FEATURE_SCALE = (0.1, 0.05)
BAR_ELONGATION = 2.2  # a bar is 3.6:1; squares, discs and triangles measure 1.0 - 1.2
MIN_CONTRAST = 0.2  # a frame whose farthest pixel is closer than this to the background has no object
STATIC_TRAVEL = 0.1  # of the shorter side, over the whole clip at the first half's velocity
COMPASS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")  # 45-degree steps


def _rgb(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] from [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3]."""
    v = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255
    return (np.moveaxis(v.astype(np.float32), 0, -1) + 1) / 2


def _background(v: np.ndarray) -> np.ndarray:
    """Per frame and channel, the plane through the border pixels (least squares), [T, H, W, 3]."""
    t, h, w, _ = v.shape
    y, x = np.mgrid[0:h, 0:w]
    ring = np.ones((h, w), bool)
    ring[1:-1, 1:-1] = False
    design = np.stack([np.ones(int(ring.sum())), y[ring], x[ring]], 1)  # [border pixels, 3]: 1, y, x
    values = v[:, ring].transpose(1, 0, 2).reshape(len(design), -1)  # [border pixels, T*3]
    a, b, c = np.linalg.solve(design.T @ design, design.T @ values).astype(np.float32).reshape(3, t, 1, 1, 3)
    return a + np.arange(h, dtype=np.float32)[:, None, None] * b + np.arange(w, dtype=np.float32)[:, None] * c


def _object_features(mask: np.ndarray) -> np.ndarray:
    """Per frame of a binary object mask [T, H, W]: (centre y, centre x, elongation, compactness,
    spread), NaN where a frame has no object pixels."""
    y, x = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]].astype(np.float32)
    m = mask.astype(np.float32)
    area = m.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cy, cx = (m * y).sum((1, 2)) / area, (m * x).sum((1, 2)) / area
        dy, dx = y - cy[:, None, None], x - cx[:, None, None]
        syy, sxx, sxy = ((m * d).sum((1, 2)) / area for d in (dy * dy, dx * dx, dy * dx))
        half_gap = np.sqrt(((syy - sxx) / 2) ** 2 + sxy**2)  # covariance eigenvalues: mean +- half_gap
        l_max, l_min = (syy + sxx) / 2 + half_gap, np.maximum((syy + sxx) / 2 - half_gap, 1e-6)
        r_max = np.where(mask, np.hypot(dy, dx), 0).max((1, 2)) + 0.5
        return np.stack(
            [cy, cx, np.sqrt(l_max / l_min), area / (np.pi * r_max**2), 2 * np.pi * (l_max + l_min) / area], 1
        )


def _classify_shape(elongation: float, compactness: float, spread: float) -> str:
    """A bar if elongated, else the nearest prototype in (compactness, spread), each in its own scale."""
    if elongation > BAR_ELONGATION:
        return "bar"
    features = np.array([compactness, spread])
    return min(PROTOTYPES, key=lambda s: float(np.sum(((features - PROTOTYPES[s]) / FEATURE_SCALE) ** 2)))


def _direction(centres: np.ndarray, frames: int, short_side: int) -> tuple[str, tuple[float, float]]:
    """Compass direction of the centroid's velocity over the first half of the clip, and (vy, vx)."""
    first = np.arange((frames - 1) // 2 + 1)
    ok = first[~np.isnan(centres[first, 0])]
    if len(ok) < 2:
        return "static", (0.0, 0.0)
    vy, vx = np.polyfit(ok, centres[ok], 1)[0]  # px per frame
    if math.hypot(vy, vx) * (frames - 1) < STATIC_TRAVEL * short_side:
        return "static", (float(vy), float(vx))
    sector = round(math.degrees(math.atan2(-vy, vx)) / 45) % 8  # y points down
    return COMPASS[sector], (float(vy), float(vx))


def probe(video: torch.Tensor | np.ndarray) -> dict:
    """Colour, motion and shape of the one object in `video` ([3, T, H, W] in [-1, 1] or uint8
    [T, H, W, 3]), read from pixels alone; plus the measurements behind them."""
    v = _rgb(video)
    t, h, w, _ = v.shape
    dist = np.sqrt(np.square(v - _background(v)).sum(-1))  # [T, H, W]
    peak = dist.reshape(t, -1).max(1)
    present = peak >= MIN_CONTRAST
    if not present.any():
        return {"colour": None, "motion": "static", "shape": None, "frames": t, "present": 0.0}
    core = dist >= 0.75 * peak[:, None, None]
    rgb = v[core & present[:, None, None]].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.sum((rgb - np.array(COLOURS[c])) ** 2)))
    feats = _object_features((dist > 0.5 * peak[:, None, None]) & present[:, None, None])
    elongation, compactness, spread = np.nanmedian(feats[:, 2:], axis=0)
    motion, velocity = _direction(feats[:, :2], t, min(h, w))
    return {
        "colour": colour,
        "motion": motion,
        "shape": _classify_shape(elongation, compactness, spread),
        "frames": t,
        "rgb": rgb.tolist(),
        "velocity": velocity,
        "track": feats[:, :2].tolist(),
        "present": float(present.mean()),
        "elongation": float(elongation),
        "compactness": float(compactness),
        "spread": float(spread),
    }


def _scored(prediction: dict, attributes: Sequence[str]) -> tuple[str, ...]:
    """The attributes a video is scored on: motion only if it has more than one frame."""
    return tuple(a for a in attributes if a != "motion" or prediction["frames"] > 1)


def _chance(predictions: Sequence[dict], prompts: Sequence[dict], attributes: Sequence[str]) -> float:
    """Expected accuracy (every attribute in `attributes` right) with the prompts shuffled among
    the videos, exact over all orders: per scored video, the fraction of prompts that match it."""
    hits, scored, tables = 0, 0, {}
    for pred in predictions:
        if keys := _scored(pred, attributes):
            if keys not in tables:
                tables[keys] = Counter(tuple(p[a] for a in keys) for p in prompts)
            hits, scored = hits + tables[keys][tuple(pred[a] for a in keys)], scored + 1
    return hits / (scored * len(prompts)) if scored else float("nan")


def alignment_score(videos: Iterable[torch.Tensor | np.ndarray], prompts_attrs: Sequence[dict]) -> dict:
    """How often the probe reads back what each video's prompt asked for, next to chance.

    `prompts_attrs[i]` holds the attributes video i was asked for (a procedural clip's `attrs`,
    or a dict of colour / motion / shape): an attribute is scored when every prompt states it;
    motion on videos only (an image is static by definition). Returns per attribute `accuracy`,
    `n` (videos scored), `chance` (the expected accuracy with the prompts shuffled among these
    videos: what a generator that ignores its prompt scores, given both marginals) and `uniform`
    (1 / number of classes); then `score` (mean accuracy over attributes) with `score_chance`,
    `all` (every scored attribute right) with `all_chance`, and the probe's `predictions`."""
    predictions = [probe(v) for v in videos]
    if len(predictions) != len(prompts_attrs) or not predictions:
        raise ValueError(f"{len(predictions)} videos but {len(prompts_attrs)} prompts")
    attributes = [a for a in ATTRIBUTES if all(a in p for p in prompts_attrs)]
    result: dict = {"accuracy": {}, "n": {}, "chance": {}, "uniform": {}}
    for a in attributes:
        hits = [pred[a] == p[a] for pred, p in zip(predictions, prompts_attrs) if _scored(pred, (a,))]
        result["accuracy"][a] = float(np.mean(hits)) if hits else float("nan")
        result["n"][a], result["uniform"][a] = len(hits), 1 / len(CLASSES[a])
        result["chance"][a] = _chance(predictions, prompts_attrs, (a,))
    result["score"] = float(np.nanmean(list(result["accuracy"].values())))
    result["score_chance"] = float(np.nanmean(list(result["chance"].values())))
    pairs = zip(predictions, prompts_attrs)
    result["all"] = float(np.mean([all(pred[a] == p[a] for a in _scored(pred, attributes)) for pred, p in pairs]))
    result["all_chance"] = _chance(predictions, prompts_attrs, attributes)
    result["predictions"] = predictions
    return result
