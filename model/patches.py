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


def sincos_3d(dim: int, grid: Patch, device: torch.device) -> torch.Tensor:
    """[T'*H'*W', dim] fixed positions for a token grid: a quarter of the channels for time,
    the rest split between height and width. Computed per call (never cached), so any grid
    works and FLOP counting on fake tensors leaves nothing behind."""
    d_t = dim // 4 // 2 * 2
    d_h = (dim - d_t) // 2 // 2 * 2
    d_w = dim - d_t - d_h
    t, h, w = (torch.arange(n, device=device) for n in grid)
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.cat([sincos_1d(d_t, tt.flatten()), sincos_1d(d_h, hh.flatten()), sincos_1d(d_w, ww.flatten())], dim=1)
