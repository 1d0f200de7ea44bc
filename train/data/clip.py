"""The unit every dataset yields: one captioned clip (an image is a 1-frame clip)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Clip:
    video: torch.Tensor  # [3, T, H, W] float32 in [-1, 1]
    caption: str
    fps: float = 8.0
    attrs: dict = field(default_factory=dict)  # what generated it (procedural data): the probe's ground truth
    source: str = ""  # file path or "procedural:<index>", for error reports
