"""Procedural captioned videos: one coloured shape moving over a dark background, made on the fly.

The dataset ships with the code (nothing to download) and knows its own ground truth, so a
generated sample can be scored against its prompt: `train.probe` recovers colour, motion and
shape from pixels and compares them with the attributes drawn here.

Every clip is a pure function of (seed, index): the index's own RNG, numpy default_rng([seed, i]),
draws the clip's (T, H, W) first (so `size_of` answers a bucketing sampler without drawing
anything else), then the attributes, then the caption's wording. Rendering reads only the attributes.

Conventions the probe relies on (its ground truth):
- the object is a corner of the RGB cube (any two palette colours differ by 1 in a channel) and
  the background is dark (every channel <= 0.25), so neither is mistaken for the other;
- the object stays wholly inside the frame, one pixel clear of the border, which stays background;
- `motion` is the direction of travel over the first half of the clip: a bouncing object reaches
  its first edge no earlier than halfway, so its label is the direction it starts in;
- a 1-frame clip (an image) is static: no motion, spin or growth, and its caption claims none.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from train.data.clip import GeneratedClips

COLOURS = {  # the RGB cube's corners but black
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "magenta": (1, 0, 1),
    "cyan": (0, 1, 1),
    "white": (1, 1, 1),
}
BACKGROUNDS = {
    "black": (0.02, 0.02, 0.02),
    "dark grey": (0.15, 0.15, 0.15),
    "navy": (0.04, 0.06, 0.25),
    "maroon": (0.25, 0.04, 0.06),
    "dark green": (0.03, 0.18, 0.06),
    "dark purple": (0.16, 0.05, 0.22),
}
SHAPES = ("square", "circle", "triangle", "bar")
ORIENTED = ("square", "triangle", "bar")  # a circle's spin is invisible
DIRECTIONS = {  # (dy, dx), y down; diagonals move equally far along both axes (45 degrees)
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
    "up-left": (-1, -1),
    "up-right": (-1, 1),
    "down-left": (1, -1),
    "down-right": (1, 1),
}
MOTIONS = (*DIRECTIONS, "static")
SIZES = {"small": 0.3, "medium": 0.38, "large": 0.46}  # object diameter / shorter frame side
GROWTH = 1.6  # growing (shrinking) clips scale by this (its inverse), centred on the nominal size

COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "lime", "emerald"),
    "blue": ("blue", "cobalt", "royal blue"),
    "yellow": ("yellow", "golden", "lemon"),
    "magenta": ("magenta", "fuchsia", "hot pink"),
    "cyan": ("cyan", "aqua", "turquoise"),
    "white": ("white", "snow-white", "bright white"),
}
SHAPE_WORDS = {
    "square": ("square", "box", "block"),
    "circle": ("circle", "disc", "ball", "dot"),
    "triangle": ("triangle", "triangular tile"),
    "bar": ("bar", "rod", "stick", "stripe"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}
DIRECTION_WORDS = {
    "left": ("left", "to the left", "leftwards"),
    "right": ("right", "to the right", "rightwards"),
    "up": ("up", "upwards", "towards the top"),
    "down": ("down", "downwards", "towards the bottom"),
    "up-left": ("up and to the left", "diagonally up-left", "towards the top left"),
    "up-right": ("up and to the right", "diagonally up-right", "towards the top right"),
    "down-left": ("down and to the left", "diagonally down-left", "towards the bottom left"),
    "down-right": ("down and to the right", "diagonally down-right", "towards the bottom right"),
}
VERBS = ("moving", "drifting", "sliding", "travelling", "gliding")
SPIN_WORDS, STILL_WORDS = ("rotating", "spinning", "turning"), ("standing still", "motionless", "at rest")
SCALE_WORDS = {"growing": ("growing", "getting bigger", "expanding"), "shrinking": ("shrinking", "getting smaller")}
BACKDROP_WORDS = ("background", "backdrop")
TEMPLATES = (  # {subject} = "a small red square"; {bare} = "red square"
    "{subject} {action} {bg}",
    "{subject} {action}",
    "{bare}, {action}",
    "a video of {subject} {action} {bg}",
    "{bg_cap}, {subject} is {action}",
)
IMAGE_TEMPLATES = ("{subject} {bg}", "{subject}", "{bare}", "an image of {subject} {bg}", "a picture of {subject}")


def _pick(rng: np.random.Generator | None, options):
    """A random option, or the first (the canonical wording) when there is no RNG."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """Describe `attrs` in words; with no RNG the plain canonical prompt ("a blue circle moving up").

    Only `colour` and `shape` are required, so an eval can build prompts from chosen attributes;
    size, background, spin, growth and bouncing are mentioned when present (and not 'none')."""
    image = attrs.get("frames", 2) == 1
    bare = f"{_pick(rng, COLOUR_WORDS[attrs['colour']])} {_pick(rng, SHAPE_WORDS[attrs['shape']])}"
    size = _pick(rng, SIZE_WORDS[attrs["size"]]) + " " if attrs.get("size") else ""
    subject = ("an " if (size or bare)[0] in "aeiou" else "a ") + size + bare
    actions = []
    if attrs.get("motion", "static") != "static":
        actions.append(f"{_pick(rng, VERBS)} {_pick(rng, DIRECTION_WORDS[attrs['motion']])}")
        actions += ["bouncing off the edges"] if attrs.get("bouncing") else []
    if attrs.get("rotating"):
        actions.append(_pick(rng, SPIN_WORDS))
    if attrs.get("scaling", "none") != "none":
        actions.append(_pick(rng, SCALE_WORDS[attrs["scaling"]]))
    if not actions and not image:
        actions.append(_pick(rng, STILL_WORDS))
    action = " and ".join(actions) if len(actions) < 3 else ", ".join(actions[:-1]) + " and " + actions[-1]
    kind, bg = attrs.get("background_kind"), attrs.get("background")
    if bg is None:
        backdrop = ""
    elif kind == "gradient":
        backdrop = f"{_pick(rng, ('on', 'against', 'over'))} a dark gradient {_pick(rng, BACKDROP_WORDS)}"
    else:
        texture = _pick(rng, ("textured ", "mottled ")) if kind == "texture" else ""
        backdrop = f"{_pick(rng, ('on', 'against', 'over'))} a {texture}{bg} {_pick(rng, BACKDROP_WORDS)}"
    template = _pick(rng, IMAGE_TEMPLATES if image else TEMPLATES)
    text = template.format(subject=subject, bare=bare, action=action, bg=backdrop, bg_cap=backdrop.capitalize())
    return " ".join(text.split()).strip(" ,")


def track(attrs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre (y, x in pixels, pixel centres at integers), angle (radians) and scale."""
    t = np.arange(attrs["frames"], dtype=np.float64)
    centre = []
    for p0, v, (lo, hi) in zip(attrs["start"], attrs["velocity"], attrs["bounds"]):
        span, p = hi - lo, p0 - lo + v * t  # bouncing folds the straight path back into [lo, hi]
        centre.append(lo + (span - np.abs(span - np.mod(p, 2 * span)) if attrs["bouncing"] else p))
    u = t / max(attrs["frames"] - 1, 1) - 0.5
    return centre[0], centre[1], attrs["angle"] + attrs["spin"] * t, attrs["growth"] ** u


def _signed_distance(shape: str, qy: np.ndarray, qx: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Distance (pixels, < 0 inside) to the edge of `shape` with circumradius r, in its own frame."""
    if shape == "circle":
        return np.hypot(qy, qx) - 0.8 * r
    if shape == "square":
        return np.maximum(np.abs(qy), np.abs(qx)) - r / math.sqrt(2)
    if shape == "bar":
        return np.maximum(np.abs(qx) - r, np.abs(qy) - 0.28 * r)
    edges = [math.cos(a) * qx + math.sin(a) * qy for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    return np.maximum.reduce(edges) - r / 2  # equilateral triangle: inradius = circumradius / 2


def render(attrs: dict) -> torch.Tensor:
    """The clip the attributes describe: [3, T, H, W] float32 in [-1, 1], edges anti-aliased."""
    h, w = attrs["height"], attrs["width"]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx, angle, scale = (a.astype(np.float32)[:, None, None] for a in track(attrs))
    dy, dx = y - cy, x - cx
    cos, sin = np.cos(angle), np.sin(angle)
    sdf = _signed_distance(attrs["shape"], cos * dy - sin * dx, cos * dx + sin * dy, attrs["radius"] * scale)
    alpha = np.clip(0.5 - sdf, 0, 1)[None]  # [1, T, H, W] pixel coverage
    base = np.array(BACKGROUNDS[attrs["background"]], np.float32)[:, None, None]
    bg = np.broadcast_to(base, (3, h, w)).copy()
    if attrs["background_kind"] == "gradient":
        a = attrs["gradient_angle"]
        s = (math.cos(a) * x + math.sin(a) * y) / (abs(math.cos(a)) * w + abs(math.sin(a)) * h)
        s = s - s.min()
        to = np.array(BACKGROUNDS[attrs["gradient_to"]], np.float32)[:, None, None]
        bg = base + (to - base) * s[None]
    elif attrs["background_kind"] == "texture":  # three faint plane waves
        waves = np.random.default_rng(attrs["texture_seed"]).uniform(0, 1, (3, 3))
        for fy, fx, phase in waves:
            bg += 0.02 * np.sin(2 * math.pi * ((fy - 0.5) * y / 6 + (fx - 0.5) * x / 6 + phase))[None]
    colour = np.array(COLOURS[attrs["colour"]], np.float32)[:, None, None, None]
    video = bg[:, None] * (1 - alpha) + colour * alpha
    return torch.from_numpy((np.clip(video, 0, 1) * 2 - 1).astype(np.float32))  # texture can dip below black


class ProceduralVideos(GeneratedClips):
    """`size` clips drawn from `seed`; index i is always the same clip, caption included."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        resolutions: tuple[tuple[int, int], ...] = ((32, 32), (32, 48), (48, 32), (64, 64)),
        frames: tuple[int, ...] = (1, 5, 9, 13, 17),
        fps: tuple[float, ...] = (8.0, 12.0, 16.0, 24.0),
        static_fraction: float = 0.15,  # of videos; images are always static
        bounce_fraction: float = 0.3,  # of moving clips
        spin_fraction: float = 0.35,  # of videos whose shape has an orientation
        scale_fraction: float = 0.3,  # of videos: half growing, half shrinking
    ) -> None:
        self.n, self.seed, self.resolutions, self.frames, self.fps = size, seed, resolutions, frames, fps
        self.fractions = static_fraction, bounce_fraction, spin_fraction, scale_fraction
        self.source = "procedural"

    def _dims(self, rng: np.random.Generator) -> tuple[int, int, int]:
        h, w = self.resolutions[int(rng.integers(len(self.resolutions)))]
        return int(self.frames[int(rng.integers(len(self.frames)))]), int(h), int(w)

    def size_of(self, i: int) -> tuple[int, int, int]:
        """(T, H, W) of clip i, without rendering it (for bucketing samplers)."""
        return self._dims(np.random.default_rng([self.seed, i]))

    def describe(self, i: int) -> tuple[dict, str]:
        """Attributes and caption of clip i, without rendering it (any i >= 0, also past len)."""
        rng = np.random.default_rng([self.seed, i])
        (t, h, w), (p_static, p_bounce, p_spin, p_scale) = self._dims(rng), self.fractions
        video = t > 1
        a = dict(
            frames=t,
            height=h,
            width=w,
            fps=float(_pick(rng, self.fps)),
            shape=_pick(rng, SHAPES),
            colour=_pick(rng, tuple(COLOURS)),
            size=_pick(rng, tuple(SIZES)),
        )
        a["motion"] = "static" if not video or rng.random() < p_static else _pick(rng, tuple(DIRECTIONS))
        a["bouncing"] = bool(a["motion"] != "static" and rng.random() < p_bounce)
        a["rotating"] = bool(video and a["shape"] in ORIENTED and rng.random() < p_spin)
        a["scaling"] = _pick(rng, ("growing", "shrinking")) if video and rng.random() < p_scale else "none"
        a["background_kind"] = _pick(rng, ("plain", "plain", "gradient", "texture"))
        a["background"], a["gradient_to"] = (str(b) for b in rng.choice(list(BACKGROUNDS), 2, replace=False))
        a["gradient_angle"], a["texture_seed"] = float(rng.uniform(0, 2 * math.pi)), int(rng.integers(2**31))
        # geometry: the largest the object gets must fit one pixel inside the frame
        a["radius"] = SIZES[a["size"]] * min(h, w) / 2
        a["growth"] = {"none": 1.0, "growing": GROWTH, "shrinking": 1 / GROWTH}[a["scaling"]]
        reach = a["radius"] * (math.sqrt(GROWTH) if a["scaling"] != "none" else 1.0) + 1
        a["bounds"] = [(reach, n - 1 - reach) for n in (h, w)]
        a["angle"] = float(rng.uniform(0, 2 * math.pi))
        a["spin"] = float(rng.choice((-1, 1)) * rng.uniform(1.0, 2.5) / max(t - 1, 1)) if a["rotating"] else 0.0
        d = DIRECTIONS.get(a["motion"], (0, 0))
        room = min(hi - lo for (lo, hi), s in zip(a["bounds"], d) if s) if any(d) else 0.0
        # travel over the clip: most of the room, or past an edge (reached after halfway) when bouncing
        travel = room * rng.uniform(*((1.2, 1.8) if a["bouncing"] else (0.6, 1.0)))
        a["velocity"] = [s * travel / max(t - 1, 1) for s in d]
        a["start"] = []
        for (lo, hi), s in zip(a["bounds"], d):
            if s == 0 or not a["bouncing"]:  # anywhere the straight path stays inside
                p = rng.uniform(lo + travel * (s < 0), hi - travel * (s > 0))
            else:  # the wall ahead is at least half the travel away
                gap = rng.uniform(travel / 2, min(travel, hi - lo))
                p = hi - gap if s > 0 else lo + gap
            a["start"].append(float(p))
        return a, caption(a, rng)

    render = staticmethod(render)  # the module's renderer: a clip from its attributes
