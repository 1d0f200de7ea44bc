"""Exact FLOPs of `model.dit.DiT`, by part, from its config and input size.

It lives beside the DiT because it mirrors the DiT's code layer by layer: a change to one is a
change to the other.

Counts matmuls and attention only (2 FLOPs per multiply-add), the same ops the measured
counter sees, so the two agree to rounding. Backward of a linear layer is 2x its forward
(input gradient + weight gradient) except where its input needs no gradient: the patch
embedding (the latent is data), the timestep MLP's first layer (a fixed sinusoid) and the
caption projection's first layer (frozen text-encoder output) compute the weight gradient
only, 1x.
"""

from __future__ import annotations

import math

from model.dit import DiTConfig
from model.patches import patch_grid
from profiling.measure import attention_flops
from profiling.parts import ATTENTION, CONTEXT, DENSE, PER_SAMPLE

FREQ_DIM = 256  # timestep sinusoid width (model.dit.TimestepEmbedder)


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def dit_flops(
    cfg: DiTConfig,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_len: int = 0,
    backward: bool = False,
) -> dict[str, int]:
    """FLOPs by part of one forward (or forward + backward) pass over a latent [B, C, T, H, W].

    `text_len` is the (padded) number of text tokens each sample cross-attends to.
    """
    d, heads, hd = cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads
    grid = patch_grid(cfg.patch_size, frames, height, width)
    n, p, hidden = math.prod(grid), math.prod(cfg.patch_size), int(d * cfg.mlp_ratio)
    rows, text_rows = batch * n, batch * text_len if cfg.text_dim else 0

    patch_embed = _linear(rows, cfg.in_channels * p, d)
    per_block_dense = _linear(rows, d, 3 * d) + _linear(rows, d, d) + 2 * _linear(rows, d, hidden)
    if cfg.attention == "factorized":
        per_block_dense += _linear(rows, d, 3 * d) + _linear(rows, d, d)
        t, hw = grid[0], grid[1] * grid[2]
        per_block_attn = attention_flops(batch * t, heads, hw, hw, hd, hd, False)
        per_block_attn += attention_flops(batch * hw, heads, t, t, hd, hd, False)
    else:
        per_block_attn = attention_flops(batch, heads, n, n, hd, hd, False)
    per_block_context = 0
    caption_first = 0
    if cfg.text_dim:
        per_block_dense += 2 * _linear(rows, d, d)  # cross-attention q and output projection
        per_block_attn += attention_flops(batch, heads, n, text_len, hd, hd, False)
        per_block_context = _linear(text_rows, d, 2 * d)  # cross-attention k, v from text tokens
        caption_first = _linear(text_rows, cfg.text_dim, d)
    t_first = _linear(batch, FREQ_DIM, d)
    if cfg.text_dim and cfg.pooled_text:  # the pooled caption's MLP: its first layer's input is frozen
        t_first += _linear(batch, cfg.text_dim, d)
        pooled_second = _linear(batch, d, d)
    else:
        pooled_second = 0

    fwd = {
        DENSE: patch_embed + cfg.depth * per_block_dense + _linear(rows, d, p * cfg.out_channels),
        ATTENTION: cfg.depth * per_block_attn,
        PER_SAMPLE: t_first
        + _linear(batch, d, d)
        + pooled_second
        + cfg.depth * _linear(batch, d, 6 * d)
        + _linear(batch, d, 2 * d),
        CONTEXT: caption_first + (_linear(text_rows, d, d) if cfg.text_dim else 0) + cfg.depth * per_block_context,
    }
    if not backward:
        return fwd
    no_input_grad = {DENSE: patch_embed, PER_SAMPLE: t_first, CONTEXT: caption_first, ATTENTION: 0}
    return {part: 3 * f - no_input_grad[part] for part, f in fwd.items()}
