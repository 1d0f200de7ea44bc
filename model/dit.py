"""The spacetime-patch diffusion transformer, top to bottom.

    latent [B, C, T, H, W]
      -> Conv3d patch embed (kernel = stride = (pt, ph, pw))   tokens N = T/pt * H/ph * W/pw
      -> + 3D sin-cos positions computed for this grid          any resolution / duration / aspect
         (or, positions: rope, axial rotary positions inside every self-attention)
      -> depth x DiTBlock:
           adaLN-Zero(t [+ class]) -> self-attention  (full spacetime, or spatial then temporal;
                                      qk_norm: RMSNorm on each head's queries and keys)
           cross-attention to text tokens (PixArt-alpha style, key-padding mask)
           adaLN-Zero -> MLP
      -> adaLN final layer -> linear -> unpatchify           [B, C_out, T, H, W]

With `num_classes > 0` and no text this is the DiT paper's class-conditional model
(Peebles & Xie 2022): the `dit-*` configs match its parameter counts and forward FLOPs.
Positions are computed on the fly (never cached) so that counting FLOPs on fake tensors
cannot leave fake tensors behind in the module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.patches import apply_rope, patch_grid, rope_3d, sincos_3d, unpatchify
from profiling.parts import CONTEXT, EMBEDDING, PER_SAMPLE, PartRules


@dataclass
class DiTConfig:
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 0  # > 0: cross-attention to text-encoder tokens of this width
    num_classes: int = 0  # > 0: class-conditional (DiT paper), plus one "null" class for CFG
    learn_sigma: bool = False  # DiT paper's eps-model also predicts the variance (2x channels)
    attention: str = "full"  # "full" spacetime or "factorized" (spatial, then temporal)
    pooled_text: bool = False  # also add the text's mean token state to the adaLN conditioning (SD3's pooled text)
    target: str = "native"  # what the output means: "native" (flow: velocity, ddpm: noise) or "data" (the clean latent)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (SD3, Open-Sora 2): bounded logits at high LR
    positions: str = "sincos"  # "sincos" added to the tokens (DiT) or "rope" rotating queries and keys

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # JSON round-trips lists
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.attention not in ("full", "factorized"):
            raise ValueError(f"attention must be 'full' or 'factorized', got {self.attention!r}")
        if self.target not in ("native", "data"):
            raise ValueError(f"target must be 'native' or 'data', got {self.target!r}")
        if self.positions not in ("sincos", "rope"):
            raise ValueError(f"positions must be 'sincos' or 'rope', got {self.positions!r}")
        if self.positions == "rope" and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"positions 'rope' rotates channel pairs: the head width {self.hidden_size // self.num_heads} must be even"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def num_tokens(self, frames: int, height: int, width: int) -> int:
        """Spacetime patches of a latent of this size (raises if it does not tile)."""
        return math.prod(patch_grid(self.patch_size, frames, height, width))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [..., L, head_dim], broadcast over heads


class Attention(nn.Module):
    """Multi-head attention through SDPA (flash kernels on GPU). `kv=None` means self-attention."""

    def __init__(self, dim: int, heads: int, cross: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        if cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        norm = (lambda: nn.RMSNorm(dim // heads, eps=1e-6)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, D/heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        if kv is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.q(x), self.kv(kv).chunk(2, dim=-1)
        q, k = self.q_norm(self._split(q)), self.k_norm(self._split(k))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if mask is not None:
            mask = mask[:, None, None, :]  # [B, 1, 1, L_kv] key-padding mask, True = attend
        out = F.scaled_dot_product_attention(q, k, self._split(v), attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    """adaLN-Zero block: every residual branch is gated by a conditioning-predicted scale that
    starts at zero, so the block starts as the identity (DiT paper, sec. 3.2)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.factorized = cfg.attention == "factorized"
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.temporal_attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm) if self.factorized else None
        self.cross_attn = Attention(d, cfg.num_heads, cross=True, qk_norm=cfg.qk_norm) if cfg.text_dim else None
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def _self_attention(self, h: torch.Tensor, grid: tuple[int, int, int], rope: Rope | None) -> torch.Tensor:
        if not self.factorized:
            return self.attn(h, rope=rope)
        b, (t, hh, ww), d = h.shape[0], grid, h.shape[-1]

        def tables(order: tuple[int, ...]) -> Rope | None:  # the grid's tables in this attention's token order
            return (
                None
                if rope is None
                else tuple(r.view(t, hh * ww, -1).permute(*order, 2).repeat(b, 1, 1)[:, None] for r in rope)
            )

        spatial = self.attn(h.reshape(b * t, hh * ww, d), rope=tables((0, 1))).reshape(b, t, hh * ww, d)
        temporal = self.temporal_attn(spatial.transpose(1, 2).reshape(b * hh * ww, t, d), rope=tables((1, 0)))
        return temporal.reshape(b, hh * ww, t, d).transpose(1, 2).reshape(b, t * hh * ww, d)

    def forward(self, x, c, grid, context=None, context_mask=None, rope: Rope | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self._self_attention(modulate(self.norm1(x), shift1, scale1), grid, rope)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, context_mask)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


def pooled(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the real (mask True) token states [B, L, D] -> [B, D]: the sentence embedding of
    mean-pooling encoders such as all-MiniLM-L6-v2."""
    if mask is None:
        return context.mean(1)
    weights = mask.to(context.dtype).unsqueeze(-1)
    return (context * weights).sum(1) / weights.sum(1).clamp(min=1)


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> 256-d sinusoid -> MLP (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, math.prod(cfg.patch_size) * cfg.out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(ModelMixin, ConfigMixin):
    """Diffusion transformer over spacetime patches; a diffusers model (save/from_pretrained)."""

    _supports_gradient_checkpointing = True  # enable_gradient_checkpointing() recomputes each block

    # Which modules belong to which compute part (profiling.parts); the rest is "dense".
    flop_parts: PartRules = (
        (r"adaLN_modulation|t_embedder|text_pool", PER_SAMPLE),
        (r"y_embedder", EMBEDDING),
        (r"caption_proj|cross_attn\.kv", CONTEXT),
    )

    @register_to_config
    def __init__(
        self,
        in_channels: int,
        patch_size: tuple[int, int, int],
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        text_dim: int,
        num_classes: int,
        learn_sigma: bool,
        attention: str,
        pooled_text: bool = False,
        target: str = "native",
        qk_norm: bool = False,
        positions: str = "sincos",
    ) -> None:
        """Explicit fields (diffusers' ConfigMixin reads the signature); defaults live in DiTConfig:
        build with `DiT.from_dit_config(DiTConfig(...))`."""
        super().__init__()
        self.cfg = cfg = DiTConfig(**{k: v for k, v in locals().items() if k in DiTConfig.__dataclass_fields__})
        d = cfg.hidden_size
        self.x_embedder = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.caption_proj = (
            nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
            if cfg.text_dim
            else None
        )
        # The caption's mean token state steers every block's modulation directly (SD3 adds its pooled
        # text embedding to the timestep's the same way): a small model learns "which digit" from it
        # far sooner than from cross-attention alone, whose output projection starts at zero.
        self.text_pool = (
            nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, d))
            if cfg.text_dim and cfg.pooled_text
            else None
        )
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.gradient_checkpointing = False
        self.final_layer = FinalLayer(cfg)
        self._init_weights()

    @classmethod
    def from_dit_config(cls, cfg: DiTConfig) -> DiT:
        """Build from a DiTConfig, recording every field so save_pretrained is self-contained."""
        return cls(**asdict(cfg))

    def _init_weights(self) -> None:
        """DiT's init: xavier linears, zero adaLN and output (adaLN-Zero), zero cross-attn output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.t_embedder.mlp[::2]:
            nn.init.normal_(m.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]
        zero += [b.cross_attn.proj for b in self.blocks if b.cross_attn is not None]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, C, T, H, W] latent; t: [B] timesteps; context: [B, L, text_dim] text tokens with
        context_mask [B, L] (True = real token); y: [B] class labels. Returns [B, C_out, T, H, W]."""
        cfg = self.cfg
        grid = patch_grid(cfg.patch_size, *x.shape[2:])
        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, N, D]
        rope = None
        if cfg.positions == "rope":
            rope = tuple(r.to(h.dtype) for r in rope_3d(cfg.hidden_size // cfg.num_heads, grid, x.device))
        else:
            h = h + sincos_3d(cfg.hidden_size, grid, x.device).to(h.dtype)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: pass class labels y")
            c = c + self.y_embedder(y)
        if self.caption_proj is not None:
            if context is None:
                raise ValueError("this DiT is text-conditional: pass context (text-encoder tokens)")
            context = context.to(h.dtype)
            if self.text_pool is not None:
                c = c + self.text_pool(pooled(context, context_mask))
            context = self.caption_proj(context)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, c, grid, context, context_mask, rope)
            else:
                h = block(h, c, grid, context, context_mask, rope)
        return unpatchify(self.final_layer(h, c), cfg.patch_size, grid)
