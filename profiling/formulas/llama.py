"""Exact forward FLOPs of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM), by part.

GQA (fewer K/V heads than query heads), SwiGLU MLP (gate, up, down), RoPE and RMSNorm (no
matmuls), tied or untied embeddings. The lm-head runs only at positions whose logits are
computed: the last position of a prefill, every position of a decode step.

A step processes `q_len` new tokens of a sequence that already has `past_len` tokens cached;
its queries attend causally, query i seeing past_len + i + 1 keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from profiling.parts import ATTENTION, DENSE, EMBEDDING, LM_HEAD, PartRules

# Module names of transformers' Llama-family models (serve's own model mirrors them).
DECODER_PARTS: PartRules = ((r"embed_tokens|rotary_emb", EMBEDDING), (r"lm_head", LM_HEAD))


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOP count needs from a decoder's config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_hf(cls, config) -> DecoderShape:
        """From a transformers config (LlamaConfig and friends)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


def causal_pairs(q_len: int, past_len: int) -> int:
    """(query, key) pairs of q_len new queries over past_len cached + q_len new keys."""
    return q_len * past_len + q_len * (q_len + 1) // 2


def decoder_flops(
    shape: DecoderShape, q_len: int, past_len: int = 0, logits: int | None = None, backward: bool = False
) -> dict[str, int]:
    """FLOPs by part for one sequence's step; `logits` positions get the lm-head (default: all
    q_len). Sum over the sequences of a batch for a batched step. With `backward`, a training
    step: every matmul's input needs a gradient (the embedding is trained), so backward is
    exactly 2x forward."""
    s = shape
    logits = q_len if logits is None else logits
    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = (
        2 * q_len * (s.hidden * q_out + 2 * s.hidden * kv_out + q_out * s.hidden + 3 * s.hidden * s.intermediate)
    )
    attention = 2 * s.heads * causal_pairs(q_len, past_len) * 2 * s.head_dim
    factor = 3 if backward else 1
    return {
        DENSE: factor * s.layers * per_layer,
        ATTENTION: factor * s.layers * attention,
        LM_HEAD: factor * 2 * logits * s.hidden * s.vocab,
        EMBEDDING: 0,
    }
