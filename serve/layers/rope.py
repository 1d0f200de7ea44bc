"""Rotary position embeddings with the model's scaling (linear, dynamic NTK, yarn, llama3).

The frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`, so a scaled model rotates
exactly as transformers rotates it; re-deriving yarn's ramps here would be a second copy to
keep right. cos/sin are tabulated once for every position up to max_model_len and indexed by
each token's position, which is what lets tokens of many sequences, at unrelated positions,
share one batched call; a step looks its positions up once for all layers (`forward`), and
each layer rotates its q and k with them (`rotate`).

Dynamic NTK is fixed at max_model_len (as vLLM does): transformers recomputes it from the
longest sequence in the batch, which a KV cache holding keys rotated earlier cannot follow.
The two agree for a sequence that fills max_model_len.

Scaling that the server adds (`--rope-scaling`) is applied only to the requests that need it:
the table holds the scaled rotations, then (from `native_offset` on) the model's own up to its
native context, and the model runner indexes a request that fits the native context at
position + native_offset, so it is rotated exactly as without the flag.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from serve.kernels import op


def inverse_frequencies(hf_config, rope: dict, max_model_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for the RoPE parameters `rope` of a transformers config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (known: default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    config = copy.deepcopy(hf_config)
    config.rope_parameters = dict(rope)
    seq_len = max_model_len if rope_type == "dynamic" else None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), seq_len=seq_len)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of every position up to max_positions (with the scaling applied), and,
    given `native` = (inv_freq, attention_scaling, positions) of the model's own RoPE, those
    after them from row `native_offset` on."""

    def __init__(
        self,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        max_positions: int,
        native: tuple[torch.Tensor, float, int] | None = None,
    ) -> None:
        super().__init__()
        tables = [(inv_freq, attention_scaling, max_positions)] + ([native] if native is not None else [])
        freqs = [torch.outer(torch.arange(n, dtype=torch.float, device=f.device), f) for f, _, n in tables]
        self.register_buffer(
            "cos", torch.cat([x.cos() * scale for x, (_, scale, _) in zip(freqs, tables)]), persistent=False
        )
        self.register_buffer(
            "sin", torch.cat([x.sin() * scale for x, (_, scale, _) in zip(freqs, tables)]), persistent=False
        )
        self.native_offset = max_positions if native is not None else None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each token's position, (tokens, 1, rotary_dim / 2), for `rotate`."""
        return self.cos.index_select(0, positions).unsqueeze(1).to(dtype), self.sin.index_select(
            0, positions
        ).unsqueeze(1).to(dtype)


# dtypes the C++ elementwise kernels (rotary, rms_norm) take, bit-exact with the torch fallback
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (tokens, heads, head_dim) rotated by its tokens' positions ('rotate half' layout); one
    pass of the C++ kernel on the CPU (serve.kernels), else the torch expression below."""
    fused = op("rotary") if x.is_cpu and x.dtype in FUSED_DTYPES else None
    if fused is not None:
        return fused(x, cos, sin)
    rot = cos.shape[-1] * 2  # partial rotary: only the first `rot` dims turn
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
