"""The parts a model's parameters and FLOPs split into, and why each departs from 6ND / 2NT.

The laws charge every parameter once per token (2 FLOPs forward, 4 backward). That holds for
the dense weights every token passes through and for nothing else. Each part below names a
way real compute departs from it; the report attributes the measured-vs-law gap to them.

A model declares which modules belong to which part with `PartRules`: (regex, part) pairs
searched against module names (parameter names minus their last component, or the
FlopCounterMode module path). The first match wins; no match means "dense". Attention-score
ops (SDPA and its kernels) are always "attention", whatever module runs them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

DENSE = "dense"
ATTENTION = "attention"
PER_SAMPLE = "per_sample"
CONTEXT = "context"
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
FROZEN = "frozen"

WHY: dict[str, str] = {
    DENSE: "weights every token passes through: the law's 2 FLOPs/param/token forward; backward is "
    "2x except where a layer's input needs no gradient (first layer: weight-gradient only)",
    ATTENTION: "QK^T and AV: no parameters, grows with context length; the law leaves it out",
    PER_SAMPLE: "conditioning that runs once per sample (adaLN, timestep MLP), charged per token by the law",
    CONTEXT: "weights applied per conditioning token (cross-attention K/V, caption projection), not per output token",
    EMBEDDING: "table lookups and position embeddings: ~0 FLOPs; the law's N excludes them (Kaplan)",
    LM_HEAD: "vocabulary projection: only at positions whose logits are computed",
    FROZEN: "frozen encoders (text encoder, VAE): forward only, outside the trained N",
}
PARTS: tuple[str, ...] = tuple(WHY)
# the same for an inference ledger (2NT): forward only, so nothing to say about backward
WHY_INFER: dict[str, str] = {
    **WHY,
    DENSE: "weights every token passes through: the law's 2 FLOPs/param/token (forward only)",
}

# Parts whose parameters the law's N counts (Kaplan: non-embedding, trained parameters).
LAW_PARTS: frozenset[str] = frozenset({DENSE, PER_SAMPLE, CONTEXT, LM_HEAD})

PartRules = tuple[tuple[str, str], ...]


def part_of(name: str, rules: PartRules) -> str:
    """The part of the module called `name` under `rules` (first match wins, default dense)."""
    for pattern, part in rules:
        if re.search(pattern, name):
            return part
    return DENSE


def param_parts(model: torch.nn.Module, rules: PartRules) -> dict[str, int]:
    """Parameter counts by part. Tied weights count once; frozen (no-grad) weights are FROZEN."""
    counts = {part: 0 for part in PARTS}
    for name, param in model.named_parameters():  # named_parameters() already skips tied duplicates
        module_name = name.rpartition(".")[0]
        part = part_of(module_name, rules) if param.requires_grad else FROZEN
        counts[part] += param.numel()
    return counts


def law_params(params_by_part: dict[str, int]) -> int:
    """The N the laws use: trained, non-embedding parameters."""
    return sum(n for part, n in params_by_part.items() if part in LAW_PARTS)


def merge(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum several part -> number dicts."""
    total: dict[str, int] = {}
    for c in counts:
        for part, n in c.items():
            total[part] = total.get(part, 0) + n
    return total
