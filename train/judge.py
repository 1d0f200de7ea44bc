"""Judge generated clips of labelled glyphs (digits, Fashion-MNIST items) the way the field does.

A sample follows its prompt when a classifier trained on *real* data reads the class the prompt
names, and the ink moves the way it says. The evaluator is itself validated on held-out real
clips first (`validate`), so a score never comes from a judge that cannot read real data.

    class       a small CNN trained on single real frames of the training scans at the frame
                size (positions and sizes as the data draws them), reading each frame of a
                clip; the clip's class is the argmax of its frames' mean probabilities (a soft
                majority over frames, which a single blurred frame cannot swing)
    motion      the centroid track of the ink over the clip's first half (train.probe: the
                data's convention puts a bounce after halfway), quantised to 8 compass directions
    Frechet     the Frechet distance between Gaussian fits of the classifier's penultimate
                features of generated frames and of held-out real frames (the MNIST-FID
                convention), beside its floor: the same distance between two disjoint real sets
                of the same size (the estimator's bias at that n; no model gets below it)

The classifier trains in well under a minute on one core and is cached per (data kind, frame
size, seed, version) under $MINISTACK_CACHE (~/.cache/ministack), like the FLOP/s probe.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.probe import probe

VERSION = 1  # bump when the classifier or its training changes: cached judges are then retrained
GLYPH_KINDS = ("digits", "fashion")
COMPASS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
FEATURES = 128
TRAIN_FRAMES = 16_000  # real training frames the classifier sees (rendered once, EPOCHS passes)
EPOCHS = 4


def glyph_clips(kind: str, n: int, seed: int, split: str, size: tuple[int, int, int], source: str = ""):
    """n real clips of `kind` from the images of `split`, all of `size` (T, H, W); `source`: where
    the data kind reads its files from (Fashion-MNIST's IDX directory; "" for the default)."""
    if kind == "digits":
        from train.data.digits import MovingDigits

        return MovingDigits(n, seed=seed, split=split, sizes=(size,))
    if kind == "fashion":
        from train.data.fashion import MovingFashion

        return MovingFashion(n, seed=seed, split=split, sizes=(size,), root=source or None)
    raise ValueError(f"no classifier judge for data.kind={kind!r} (judged kinds: {', '.join(GLYPH_KINDS)})")


def caption(kind: str, attrs: dict) -> str:
    """The canonical prompt for attributes of `kind` ("the digit 3 moving up and to the left")."""
    from train.data import digits, fashion

    return (digits if kind == "digits" else fashion).caption(attrs)


def prompt_attrs(kind: str, n: int, frames: int, seed: int = 0) -> list[dict]:
    """n prompts' attributes, balanced over the 10 classes x 8 directions (x 1 for images): every
    (class, direction) pair once before any twice, drawn in a seeded order, listed by class and
    direction (80 prompts tile as a 10 x 8 sheet: a row per class, a column per direction)."""
    motions = COMPASS if frames > 1 else ("static",)
    pairs = [(c, m) for c in range(10) for m in motions]
    order = np.random.default_rng(seed).permutation(len(pairs))
    key = "digits" if kind == "digits" else "items"
    out = []
    for i in sorted(order[i % len(pairs)] for i in range(n)):
        label, motion = pairs[i]
        out.append({"frames": frames, "label": label, "motion": motion, key: [{"label": label, "motion": motion}]})
    return out


def class_of(attrs: dict) -> int:
    """The single glyph's class in a clip's (or a prompt's) attributes."""
    if "label" in attrs:
        return int(attrs["label"])
    (digit,) = attrs["digits"]
    return int(digit["label"])


class GlyphClassifier(nn.Module):
    """Three conv stages and a global average pool: translation invariant, as a glyph moving
    anywhere in the frame must be read the same. Input: grey frames [B, 1, H, W] in [-1, 1],
    first averaged down to ~16 px a side (`pool`): a glyph there still spans 6-10 px, and the
    convolutions cost a quarter, so it trains for more passes in the same time."""

    def __init__(self, classes: int = 10, pool: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.AvgPool2d(pool) if pool > 1 else nn.Identity(),
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, FEATURES, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURES, classes)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.body(frames)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames))


def input_pool(height: int, width: int) -> int:
    """The classifier's input averaging: frames down to at least 16 px a side."""
    return max(1, min(height, width) // 16)


def grey_frames(videos: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B*T, 1, H, W] (channel mean), clipped to [-1, 1]."""
    b, _, t, h, w = videos.shape
    return videos.float().mean(1).clamp(-1, 1).reshape(b * t, 1, h, w)


def _real_frames(
    kind: str, n: int, seed: int, split: str, height: int, width: int, source: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    data = glyph_clips(kind, n, seed, split, (1, height, width), source)
    videos, labels = [], []
    for i in range(n):
        clip = data[i]
        videos.append(clip.video)
        labels.append(class_of(clip.attrs))
    return grey_frames(torch.stack(videos)), torch.tensor(labels)


def train_classifier(
    kind: str, height: int, width: int, seed: int = 0, frames: int = TRAIN_FRAMES, source: str = ""
) -> GlyphClassifier:
    """The classifier, trained on `frames` real single frames of the training scans (Adam, a
    cosine schedule, EPOCHS passes). Deterministic for a seed on one machine."""
    torch.manual_seed(seed)
    x, y = _real_frames(kind, frames, seed + 1_000, "train", height, width, source)
    model = GlyphClassifier(pool=input_pool(height, width))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = 128
    steps = EPOCHS * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def _cache_file(kind: str, height: int, width: int, seed: int, source: str) -> Path:
    root = Path(os.environ.get("MINISTACK_CACHE", Path.home() / ".cache" / "ministack"))
    key = (
        f"{kind}|{height}x{width}|{seed}|{VERSION}|{TRAIN_FRAMES}|{EPOCHS}|{os.path.abspath(source) if source else ''}"
    )
    key = hashlib.sha1(key.encode()).hexdigest()[:10]
    return root / "judges" / f"{kind}-{height}x{width}-{key}.pt"


def load_classifier(kind: str, height: int, width: int, seed: int = 0, source: str = "", log=print) -> GlyphClassifier:
    """The cached classifier for (kind, frame size), trained and cached on first use."""
    path = _cache_file(kind, height, width, seed, source)
    model = GlyphClassifier(pool=input_pool(height, width))
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except (RuntimeError, OSError, ValueError):  # a torn or foreign file: retrain over it
            pass
    log(
        f"judge: training the {kind} classifier at {height}x{width} on real training scans (once; cached in {path.parent})"
    )
    with torch.inference_mode(False):
        model = train_classifier(kind, height, width, seed, source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


@dataclass
class Reading:
    """What the judge reads from clips: per clip the class, the motion, and per frame the features."""

    classes: list[int]
    motions: list[str]
    features: np.ndarray  # [clips * frames, FEATURES]


@torch.no_grad()
def read(classifier: GlyphClassifier, videos: torch.Tensor) -> Reading:
    """Class (soft majority over frames), motion (centroid track) and features of [B, 3, T, H, W] clips."""
    b, t = videos.shape[0], videos.shape[2]
    frames = grey_frames(videos)
    feats = torch.cat([classifier.features(frames[s : s + 256]) for s in range(0, len(frames), 256)])
    probs = classifier.head(feats).softmax(-1).reshape(b, t, -1).mean(1)
    motions = [probe(v)["motion"] if t > 1 else "static" for v in videos]
    return Reading(probs.argmax(-1).tolist(), motions, feats.numpy().astype(np.float64))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [n, d] and b [m, d]."""
    import warnings

    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a degenerate set (blank frames: dead features) has a singular covariance
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a proportion hits / n: honest at small n and
    near 0 or 1, where the normal approximation gives intervals outside [0, 1]."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = hits / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Accuracy:
    """A proportion with its 95 % Wilson interval and the accuracy chance would get."""

    hits: int
    n: int
    chance: float

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.hits, self.n)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.value:.1%} [{low:.0%}, {high:.0%}] (chance {self.chance:.1%}, n={self.n})"

    def to_dict(self) -> dict:
        low, high = self.interval
        return {"accuracy": self.value, "low": low, "high": high, "chance": self.chance, "n": self.n}


def score(reading: Reading, wanted: list[dict], classes: int = 10) -> dict[str, Accuracy]:
    """Class and motion accuracy of `reading` against the attributes each clip was asked for;
    motion on multi-frame clips that name one. Chance: uniform over classes / 8 directions."""
    result = {
        "class": Accuracy(sum(c == class_of(a) for c, a in zip(reading.classes, wanted)), len(wanted), 1 / classes)
    }
    moving = [(m, a["motion"]) for m, a in zip(reading.motions, wanted) if a.get("motion", "static") != "static"]
    if moving:
        result["motion"] = Accuracy(sum(m == w for m, w in moving), len(moving), 1 / 8)
    return result


@dataclass
class Judge:
    """A classifier for one (kind, frame size), its validation on held-out real clips, and the
    real features and floor the Frechet distance is measured against."""

    kind: str
    size: tuple[int, int, int]  # (T, H, W) of the clips it judges
    classifier: GlyphClassifier
    validity: dict[str, Accuracy]  # the judge's own accuracy on held-out real clips
    real_features: np.ndarray  # frames of held-out real clips (reference set)
    floor_features: np.ndarray  # frames of other held-out real clips (the real-vs-real floor)

    def frechet(self, features: np.ndarray) -> tuple[float, float]:
        """(FD of `features` against the real reference, real-vs-real floor at the same n)."""
        n = min(len(features), len(self.real_features), len(self.floor_features))
        return (
            frechet_distance(features[:n], self.real_features[:n]),
            frechet_distance(self.floor_features[:n], self.real_features[:n]),
        )


def real_reading(
    classifier: GlyphClassifier, kind: str, n: int, seed: int, size: tuple[int, int, int], source: str = ""
) -> tuple[Reading, list[dict]]:
    """The judge's reading of n held-out real clips (validation scans), with their attributes."""
    data = glyph_clips(kind, n, seed, "val", size, source)
    clips = [data[i] for i in range(n)]
    return read(classifier, torch.stack([c.video for c in clips])), [c.attrs for c in clips]


def make_judge(
    kind: str, size: tuple[int, int, int], n: int = 200, seed: int = 0, source: str = "", log=print
) -> Judge:
    """The judge for clips of `size`, validated on n held-out real clips (scans no training run
    sees: the validation split), with two more disjoint real sets for the Frechet reference and floor."""
    classifier = load_classifier(kind, size[1], size[2], seed, source, log)
    reading, attrs = real_reading(classifier, kind, n, 90_001 + seed, size, source)
    reference, _ = real_reading(classifier, kind, n, 90_002 + seed, size, source)
    floor, _ = real_reading(classifier, kind, n, 90_003 + seed, size, source)
    return Judge(kind, size, classifier, score(reading, attrs), reference.features, floor.features)
