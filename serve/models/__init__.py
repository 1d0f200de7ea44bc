"""Model definitions the engine can run, and building one from a transformers directory."""

from __future__ import annotations

from pathlib import Path

import torch

from serve.layers.linear import can_pack, layout_linears
from serve.layers.rope import RotaryEmbedding, inverse_frequencies
from serve.models.llama import LlamaForCausalLM, biases_of, stack_projections
from serve.weights import load_state_dict

# transformers model types that are this architecture (their differences are read from the checkpoint)
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})


def load_model(
    model_dir: Path,
    hf_config,
    rope: dict,
    max_model_len: int,
    dtype: torch.dtype,
    device: torch.device,
    half_weights: bool = False,
    native_rope: tuple[dict, int] | None = None,
) -> LlamaForCausalLM:
    """The model of `model_dir` with its weights, in eval mode on `device`; with `half_weights`
    (the CPU, float32) its linear layers' weights stored in float16 (serve.layers.linear). With
    `native_rope` = (the model's own RoPE parameters, its context) beside a scaled `rope`, both
    rotations are tabulated (serve.layers.rope: requests that fit the native context use it)."""
    if hf_config.model_type not in LLAMA_FAMILY:
        raise ValueError(
            f"model type {hf_config.model_type!r} is not supported (supported: {', '.join(sorted(LLAMA_FAMILY))})"
        )
    state = stack_projections(load_state_dict(model_dir))
    inv_freq, scaling = inverse_frequencies(hf_config, rope, max_model_len)
    native = None
    if native_rope is not None:
        native = (*inverse_frequencies(hf_config, native_rope[0], native_rope[1]), native_rope[1])
    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = LlamaForCausalLM(hf_config, RotaryEmbedding(inv_freq, scaling, max_model_len), biases_of(state))
    model.to_empty(device=device)
    model.model.rotary_emb = RotaryEmbedding(inv_freq, scaling, max_model_len, native).to(device)  # real cos/sin tables
    model.tie_weights()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.tied)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model = model.to(
        dtype
    ).eval()  # forward runs under no_grad; requires_grad stays on so param_parts sees trained weights
    if half_weights or can_pack(device, dtype):
        layout_linears(model, half=half_weights, keep=frozenset({id(model.model.embed_tokens.weight)}))
    return model
