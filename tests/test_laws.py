"""The laws and the exact formulas against cases worked out by hand."""

import pytest

from model.dit import DiTConfig
from profiling import laws
from model.flops.formula import dit_flops
from profiling.formulas.llama import DecoderShape, causal_pairs, decoder_flops
from profiling.measure import attention_flops, attention_pairs


def test_laws_by_hand():
    assert laws.train_flops(175e9, 300e9) == pytest.approx(3.15e23)
    assert laws.infer_flops(7e9, 1000) == pytest.approx(1.4e13)
    # Kaplan Table 1: 2N + 2 * n_layer * n_ctx * d_attn = 2*100 + 2*2*10*4 = 360
    assert laws.kaplan_forward_flops_per_token(100, 2, 10, 4) == 360
    # PaLM: 6N + 12*L*H*Q*T = 600 + 12*2*3*4*10 = 3480
    assert laws.palm_train_flops_per_token(100, 2, 3, 4, 10) == 3480
    assert laws.law_multiplier("train") == 6 and laws.law_multiplier("infer") == 2
    with pytest.raises(ValueError, match="unknown compute kind"):
        laws.law_flops("serve", 1, 1)


def test_attention_pairs_by_hand():
    assert attention_pairs(4, 4, causal=False) == 16
    assert attention_pairs(4, 4, causal=True) == 10  # 1+2+3+4
    assert attention_pairs(6, 4, causal=True) == 10 + 2 * 4  # top-left aligned: rows 5, 6 see all 4 keys
    assert attention_pairs(2, 5, causal=True) == 1 + 2  # top-left: query i sees keys 0..i
    # 2 heads, 3 pairs, head dims 8 + 8 -> 2 * 1 * 2 * 3 * 16 = 192
    assert attention_flops(1, 2, 2, 2, 8, 8, causal=True) == 192


def test_decoder_flops_by_hand():
    s = DecoderShape(hidden=8, layers=1, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    # q 8x8, k 8x4, v 8x4, o 8x8, mlp 3 * 8x16 -> 64+32+32+64+384 = 576 MACs/token
    # 3 tokens: 2*3*576 = 3456; attention causal pairs 6, 2 heads, 4+4 dims: 2*2*6*8 = 192
    # lm-head at the last position only: 2*1*8*10 = 160
    got = decoder_flops(s, q_len=3, past_len=0, logits=1)
    assert got == {"dense": 3456, "attention": 192, "lm_head": 160, "embedding": 0}
    # decode step after 5 cached tokens: 1 query sees 6 keys
    assert causal_pairs(1, 5) == 6
    assert decoder_flops(s, 1, 5)["attention"] == 2 * 2 * 6 * 8
    train = decoder_flops(s, 3, backward=True)
    assert train["dense"] == 3 * 3456 and train["lm_head"] == 3 * 2 * 3 * 8 * 10


def test_dit_flops_by_hand():
    # d=8, 2 heads, depth 1, mlp 4x, patch (1,2,2), C=1, one 1x4x4 latent -> 4 tokens, no text
    cfg = DiTConfig(in_channels=1, patch_size=(1, 2, 2), hidden_size=8, depth=1, num_heads=2)
    f = dit_flops(cfg, batch=1, frames=1, height=4, width=4)
    patch = 2 * 4 * 4 * 8  # 4 tokens x (1*4 inputs) x 8
    block = 2 * 4 * (8 * 24 + 8 * 8 + 2 * 8 * 32)  # qkv, proj, mlp
    final = 2 * 4 * 8 * 4  # 4 outputs per token (p*C)
    assert f["dense"] == patch + block + final
    assert f["attention"] == 2 * 2 * 16 * (4 + 4)  # 2 heads, 16 pairs, head dims 4 + 4
    assert f["per_sample"] == 2 * (256 * 8 + 8 * 8 + 8 * 48 + 8 * 16)  # t-MLP, adaLN, final adaLN
    assert f["context"] == 0
    b = dit_flops(cfg, batch=1, frames=1, height=4, width=4, backward=True)
    assert b["dense"] == 3 * f["dense"] - patch  # the patch embed's input (data) needs no gradient
    assert b["per_sample"] == 3 * f["per_sample"] - 2 * 256 * 8  # nor the timestep sinusoid
    assert b["attention"] == 3 * f["attention"]


def test_dit_tokens_must_tile():
    with pytest.raises(ValueError, match="latent frames 3 does not fit patch 2,2,2"):
        DiTConfig(patch_size=(2, 2, 2)).num_tokens(3, 8, 8)
