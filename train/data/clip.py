"""The unit every dataset yields: one captioned clip (an image is a 1-frame clip)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset


@dataclass
class Clip:
    video: torch.Tensor  # [3, T, H, W] float32 in [-1, 1]
    caption: str
    fps: float = 8.0
    attrs: dict = field(default_factory=dict)  # what generated it (procedural data): the probe's ground truth
    source: str = ""  # file path or "procedural:<index>", for error reports


class GeneratedClips(Dataset):
    """Clips made on the fly, each a pure function of (seed, index), n of them. A subclass sets
    `n` and `source` (the prefix of each clip's source) and gives `describe(i)` (attributes and
    caption, without rendering) and `render(attrs)`."""

    n: int
    source: str

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Clip:
        if not 0 <= i < self.n:  # also ends plain `for clip in dataset` loops
            raise IndexError(f"index {i} out of range for {self.n} clips")
        attrs, text = self.describe(i)
        return Clip(self.render(attrs), text, fps=attrs["fps"], attrs=attrs, source=f"{self.source}:{i}")
