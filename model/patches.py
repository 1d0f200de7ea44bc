"""Spacetime patches: cutting a latent video into tokens and back, and where each token is.

A latent [B, C, T, H, W] with patch (pt, ph, pw) becomes N = T/pt * H/ph * W/pw tokens of
C*pt*ph*pw values, in (t, h, w) raster order; images are T = 1. Positions are fixed 3D sin-cos
computed for the grid at hand, so one model takes any resolution, duration and aspect ratio,
and the size of the noise grid at sampling time sets the output size.
"""

from __future__ import annotations

import torch

from model.sizes import SizeRule

Patch = tuple[int, int, int]


def patch_grid(patch: Patch, frames: int, height: int, width: int) -> Patch:
    """(T', H', W'): the token grid of a latent (T, H, W). The patch must tile it (the patch embed,
    a Conv3d of stride = patch, would drop a remainder): else a SizeError naming the nearest
    latent sizes it tiles."""
    names = ("latent frames", "latent height", "latent width")
    latent = SizeRule(patch=patch).latent((frames, height, width), names)
    return tuple(s // p for s, p in zip(latent, patch))


def patchify(x: torch.Tensor, patch: Patch) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, N, pt*ph*pw*C] (each token: its patch's values, channels last)."""
    (pt, ph, pw), (b, c) = patch, x.shape[:2]
    t, h, w = patch_grid(patch, *x.shape[2:])
    x = x.reshape(b, c, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, t * h * w, pt * ph * pw * c)


def unpatchify(tokens: torch.Tensor, patch: Patch, grid: Patch) -> torch.Tensor:
    """[B, N, pt*ph*pw*C] -> [B, C, T, H, W]; the exact inverse of `patchify`."""
    (pt, ph, pw), (t, h, w) = patch, grid
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, -1, t * pt, h * ph, w * pw)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim] sin-cos embedding of positions (dim even)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def axis_channels(dim: int) -> tuple[int, int, int]:
    """How positions split `dim` channels between time, height and width: a quarter for time, the
    rest halved between height and width (time and height even)."""
    d_t = dim // 4 // 2 * 2
    d_h = (dim - d_t) // 2 // 2 * 2
    return d_t, d_h, dim - d_t - d_h


def _axes(dim: int, grid: Patch, device: torch.device) -> tuple[tuple[int, int, int], tuple[torch.Tensor, ...]]:
    """The channel split (axis_channels) and every token's (t, h, w) index, flattened in raster order."""
    t, h, w = (torch.arange(n, device=device) for n in grid)
    return axis_channels(dim), tuple(a.flatten() for a in torch.meshgrid(t, h, w, indexing="ij"))


def sincos_3d(dim: int, grid: Patch, device: torch.device) -> torch.Tensor:
    """[T'*H'*W', dim] fixed positions for a token grid, added to the tokens. Computed per call
    (never cached), so any grid works and FLOP counting on fake tensors leaves nothing behind."""
    dims, index = _axes(dim, grid, device)
    return torch.cat([sincos_1d(d, i) for d, i in zip(dims, index)], dim=1)


def rope_3d(head_dim: int, grid: Patch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T'*H'*W', head_dim]: axial rotary positions (RoPE per axis, on the channel
    split of `sincos_3d`, as Open-Sora 2 and Wan rotate queries and keys), so attention sees each
    pair of tokens' offset in time, height and width rather than their absolute places."""
    dims, index = _axes(head_dim, grid, device)
    angles = []
    for d, i in zip(dims, index):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2))
        a = i.double()[:, None] * omega[None]
        angles.append(torch.cat([a, a], dim=1))  # the rotate-half layout: channel j pairs with j + d/2
    angles = torch.cat(angles, dim=1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, head_dim] by the tables [..., L, head_dim] (per-axis rotate-half)."""
    parts, start = [], 0
    for d in axis_channels(x.shape[-1]):
        a, b = x[..., start : start + d // 2], x[..., start + d // 2 : start + d]
        parts += [-b, a]
        start += d
    return x * cos + torch.cat(parts, dim=-1) * sin
