"""The scaling-law compute approximations that measured FLOPs are validated against.

All figures are FLOPs with one multiply-add = 2 FLOPs (the convention of Kaplan et al. and
PaLM; the DiT paper's "Gflops" are multiply-adds, i.e. half of ours).

- C_train ~= 6 * N * D   (Kaplan et al. 2020, sec. 2.1): 2N per token forward, 4N backward.
- C_infer ~= 2 * N * T   one forward pass per processed token.
- Kaplan et al. 2020, Table 1: C_forward per token = 2N + 2 * n_layer * n_ctx * d_attn,
  the second term being the attention-score work (QK^T and AV) that N does not capture.
- PaLM (Chowdhery et al. 2022, appendix B): training FLOPs per token
  = 6N + 12 * L * H * Q * T (L layers, H heads, Q head dim, T sequence length).

N here is the parameter count that multiplies every token. Which parameters belong in it is
exactly what the law glosses over; `profiling.parts` splits them so a user can see it.
"""

from __future__ import annotations


def train_flops(n_params: float, tokens: float) -> float:
    """C_train = 6 N D."""
    return 6.0 * n_params * tokens


def infer_flops(n_params: float, tokens: float) -> float:
    """C_infer = 2 N T."""
    return 2.0 * n_params * tokens


def kaplan_forward_flops_per_token(n_params: float, n_layer: int, n_ctx: int, d_attn: int) -> float:
    """Kaplan et al. 2020 Table 1: 2N + 2 n_layer n_ctx d_attn (forward, per token)."""
    return 2.0 * n_params + 2.0 * n_layer * n_ctx * d_attn


def palm_train_flops_per_token(n_params: float, n_layer: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM appendix B: 6N + 12 L H Q T (forward + backward, per token, no causal discount)."""
    return 6.0 * n_params + 12.0 * n_layer * n_heads * head_dim * seq_len


def law_flops(kind: str, n_params: float, tokens: float) -> float:
    """The law for a ledger record kind: 'train' -> 6ND, 'infer' -> 2NT."""
    if kind == "train":
        return train_flops(n_params, tokens)
    if kind == "infer":
        return infer_flops(n_params, tokens)
    raise ValueError(f"unknown compute kind {kind!r}: expected 'train' or 'infer'")


def law_multiplier(kind: str) -> float:
    """FLOPs per parameter per token the law charges: 6 for training, 2 for inference."""
    return law_flops(kind, 1.0, 1.0)
