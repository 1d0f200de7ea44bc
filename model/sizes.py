"""Which video sizes a codec and a DiT take, and the nearest ones they do when a size does not fit.

A video (frames, height, width) becomes a latent through the codec's compression (ct, ch, cw),
and the latent becomes tokens through the DiT's patch (pt, ph, pw). Both must divide exactly:

    latent t = 1 + (frames - 1) / ct      causal codec: the first frame is encoded alone (ct = 1: t = frames)
    latent h = height / ch,  w = width / cw
    tokens   t/pt · h/ph · w/pw           the DiT refuses a remainder (its stride-p Conv3d would drop it)

So per axis the sizes that work are a progression first + k·step (k >= 0): frames
1 + ct·(pt - 1) + k·ct·pt (any count when ct = pt = 1; a 1-frame image only when pt = 1), height
k·ch·ph and width k·cw·pw (k >= 1). Every size check (the codec, the DiT's token grid,
`ministack sample`, training buckets, `ministack flops count`) is a `SizeRule`, so every
refusal names the nearest sizes that pass all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

Size = tuple[int, int, int]
AXES: tuple[str, str, str] = ("frames", "height", "width")


class SizeError(ValueError):
    """A size a SizeRule refuses; `suggestions` holds the nearest sizes it takes."""

    def __init__(self, message: str, suggestions: list[Size]) -> None:
        super().__init__(message)
        self.suggestions = suggestions


def _fits(value: int, first: int, step: int) -> bool:
    return value >= first and (value - first) % step == 0


def describe(size: Size) -> str:
    """'9 frames at 24x32': a (frames, height, width) size as the messages write it."""
    f, h, w = size
    return f"{f} frame{'' if f == 1 else 's'} at {h}x{w}"


@dataclass(frozen=True)
class SizeRule:
    """The video sizes a codec of `compression` (ct, ch, cw) feeding a DiT of `patch` (pt, ph, pw)
    takes. (1, 1, 1) leaves a factor out: SizeRule(codec.compression) is the codec alone,
    SizeRule(patch=p) the DiT alone on latents."""

    compression: Size = (1, 1, 1)
    patch: Size = (1, 1, 1)

    def __post_init__(self) -> None:
        for name in ("compression", "patch"):
            factors = tuple(int(v) for v in getattr(self, name))  # JSON and YAML give lists
            if len(factors) != 3 or min(factors) < 1:
                raise ValueError(f"{name} must be three positive integers (t, h, w), got {getattr(self, name)}")
            object.__setattr__(self, name, factors)

    def progressions(self) -> tuple[tuple[int, int], ...]:
        """(first, step) per axis (frames, height, width): the sizes that fit are first + k·step, k >= 0."""
        (ct, ch, cw), (pt, ph, pw) = self.compression, self.patch
        return (1 + ct * (pt - 1), ct * pt), (ch * ph, ch * ph), (cw * pw, cw * pw)

    def fits(self, size: Size) -> bool:
        return all(_fits(v, *p) for v, p in zip(size, self.progressions()))

    def nearest(self, size: Size) -> list[Size]:
        """The nearest sizes that fit: every axis rounded down to its progression, then every axis
        rounded up; one size where the two agree (`size` itself when it fits). An axis below its
        first value rounds to that value both ways, so no suggestion has a zero."""
        down, up = [], []
        for value, (first, step) in zip(size, self.progressions()):
            k = max(value - first, 0)
            down.append(first + k // step * step)
            up.append(first + -(-k // step) * step)
        return [tuple(down)] if down == up else [tuple(down), tuple(up)]

    def requirement(self) -> str:
        """What the rule asks, in words: 'frames 1 + 2k (1, 3, 5, ...), height and width multiples of 8'."""
        (f0, fs), (_, hs), (_, ws) = self.progressions()
        clauses = []
        if fs > 1:
            clauses.append(
                f"frames a multiple of {fs}"
                if f0 == fs
                else f"frames {f0} + {fs}k ({f0}, {f0 + fs}, {f0 + 2 * fs}, ...)"
            )
        if hs == ws > 1:
            clauses.append(f"height and width multiples of {hs}")
        else:
            clauses += [f"{name} a multiple of {s}" for name, s in (("height", hs), ("width", ws)) if s > 1]
        return ", ".join(clauses) or "every axis at least 1"

    def factors(self) -> str:
        """'codec compression 2,4,4 × patch 1,2,2', leaving out a factor of (1, 1, 1)."""
        named = [("codec compression", self.compression), ("patch", self.patch)]
        return (
            " × ".join(f"{name} {','.join(map(str, v))}" for name, v in named if v != (1, 1, 1))
            or "the codec and patch"
        )

    def latent(self, size: Size, names: tuple[str, str, str] = AXES) -> Size:
        """The latent (t, h, w) of a video of `size` (frames, height, width). If the size does not
        fit: a SizeError that names the offending axes as `names` (e.g. the CLI's flags) and the
        nearest sizes that fit."""
        if not self.fits(size):
            # one flag may set two axes (--image-size): name it once
            bad = list(
                dict.fromkeys(f"{name} {v}" for name, v, p in zip(names, size, self.progressions()) if not _fits(v, *p))
            )
            suggestions = self.nearest(size)
            raise SizeError(
                f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not fit {self.factors()} "
                f"({self.requirement()}); nearest sizes that fit: {' or '.join(map(describe, suggestions))}",
                suggestions,
            )
        (ct, ch, cw), (f, h, w) = self.compression, size
        return 1 + (f - 1) // ct, h // ch, w // cw
