"""The learning-rate schedule every training stage steps: linear warm-up, then cosine to zero."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine to zero at max_steps: the LR multiplier at each step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f
