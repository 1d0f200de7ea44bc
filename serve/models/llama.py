"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) for the paged-KV engine.

Same math and the same module names as transformers' implementation but for two stacked
projections (as vLLM has them): q/k/v are one `qkv_proj` matmul and gate/up one `gate_up_proj`,
since at decode batch sizes a few wide matmuls beat several narrow ones (~17% of the linears'
time at 16 rows on the CPU). `stack_projections` concatenates a checkpoint's tensors into them;
everything else loads by name, and `profiling.formulas.llama.DECODER_PARTS` finds the embedding
and lm-head by name. The calling convention differs too: a step's tokens from many sequences
come flattened into one (tokens,) batch with their positions, attention reads and writes the
paged cache (serve.layers.attention), and the lm-head runs only at the rows whose logits are
sampled (the last token of each sequence, not a whole prefill).

Variants are read from the checkpoint rather than the model type: a projection has a bias
when the state dict holds one (Qwen2's q/k/v), and lm_head is tied to the embedding when
the config says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve.layers.attention import AttentionMetadata, PagedAttention
from serve.layers.linear import Linear
from serve.kernels import op
from serve.layers.rope import FUSED_DTYPES, RotaryEmbedding, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); with `residual`, (RMSNorm(residual + x), residual + x): the residual
        stream's add fused into the norm that reads it next (vLLM's fused_add_rms_norm), the sum
        rounded to x's dtype as `residual + x` rounds it (serve/kernels/elementwise.cpp)."""
        if residual is not None:
            fused = op("add_rms_norm") if x.is_cpu and x.dtype in FUSED_DTYPES else None
            if fused is not None:
                return fused(x, residual, self.weight, self.eps)
            x = residual + x
            return self(x), x
        fused = op("rms_norm") if x.is_cpu and x.dtype in FUSED_DTYPES else None
        if fused is not None:  # one pass, the same bits as below (serve/kernels/elementwise.cpp)
            return fused(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        # normalized in float32 whatever the model dtype, as transformers does
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: dict[str, bool], window: int | None
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv_proj = Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=bias["qkv_proj"])
        self.o_proj = Linear(heads * head_dim, hidden, bias=bias["o_proj"])
        self.attn = PagedAttention(heads, kv_heads, head_dim, window)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1
        )
        q = rotate(q.view(-1, self.heads, self.head_dim), *rope)
        k = rotate(k.view(-1, self.kv_heads, self.head_dim), *rope)
        v = v.view(-1, self.kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = op("silu_and_mul") if gate_up.is_cpu and gate_up.dtype in FUSED_DTYPES else None
        if fused is not None:  # one pass (serve/kernels/elementwise.cpp)
            return self.down_proj(fused(gate_up))
        gate, up = gate_up.chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, head_dim: int, bias: dict[str, bool], window: int | None) -> None:
        super().__init__()
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, kv_heads, head_dim, bias, window)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias["mlp"])
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' `x = x + attn(norm(x)); x = x + mlp(norm(x))`, on a residual stream
        carried as (the last sublayer's output, the sum before it): each add happens inside the
        norm that reads its result. `residual` None: `hidden` is the embedding (first layer)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden, residual = self.post_attention_layernorm(self.self_attn(hidden, rope, meta), residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg, rotary_emb: RotaryEmbedding, bias: dict[str, bool]) -> None:
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, head_dim, bias, window) for window in layer_windows(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = rotary_emb

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after the last layer, (tokens, hidden) twice: its last output not
        yet added, and the sum before it (their sum is the hidden state before the final norm)."""
        hidden, residual = self.embed_tokens(input_ids), None
        rope = self.rotary_emb(positions, hidden.dtype)  # cos/sin at the step's positions, for every layer
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, meta)
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg, rotary_emb: RotaryEmbedding, bias: dict[str, bool]) -> None:
        super().__init__()
        self.model = DecoderModel(cfg, rotary_emb, bias)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the lm-head where the config ties them (again after
        materializing from the meta device, which gives each module its own tensor)."""
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits (len(logits_rows), vocab) at the given rows of the flattened step."""
        hidden, residual = self.model(input_ids, positions, meta)
        normed, _ = self.model.norm(
            hidden[logits_rows], residual[logits_rows]
        )  # the last add, at the sampled rows only
        return self.lm_head(normed)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


def layer_windows(cfg) -> list[int | None]:
    """Each layer's sliding-window length, None for full attention: Mistral's `sliding_window`
    on every layer; per `layer_types` where the config lists them (Qwen2 with
    use_sliding_window: layers from max_window_layers on)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window:
        return [None] * cfg.num_hidden_layers
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    everywhere = cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)
    return [window if everywhere else None] * cfg.num_hidden_layers


# the stacked projections and the checkpoint tensors each one concatenates, in order
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def stack_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with q/k/v and gate/up weights (and biases) concatenated into
    qkv_proj / gate_up_proj; every other tensor as it was."""
    out = dict(state)
    for merged, parts in STACKED.items():
        for key in [k for k in state if f".{parts[0]}." in k]:
            names = [key.replace(f".{parts[0]}.", f".{p}.") for p in parts]
            if not all(n in state for n in names):
                raise ValueError(f"checkpoint has {key} but not all of {names}")
            out[key.replace(f".{parts[0]}.", f".{merged}.")] = torch.cat([out.pop(n) for n in names])
    return out


def biases_of(state: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Which projections carry a bias in this (stacked) checkpoint (Qwen2: q/k/v; Llama: per config)."""
    prefix = "model.layers.0."
    return {
        "qkv_proj": f"{prefix}self_attn.qkv_proj.bias" in state,
        "o_proj": f"{prefix}self_attn.o_proj.bias" in state,
        "mlp": f"{prefix}mlp.gate_up_proj.bias" in state,
    }
