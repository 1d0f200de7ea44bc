"""Measured FLOPs on CUDA kernels (flash, memory-efficient, cuDNN attention) against the exact
formulas. Runs only where a GPU is present."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.dit import DiT, DiTConfig
from model.flops.formula import dit_flops
from profiling.formulas.llama import DECODER_PARTS, DecoderShape, decoder_flops
from profiling.measure import count_flops, forward_backward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(
    "backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
)
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_dit_train_step_on_each_cuda_kernel(backend, fake):
    cfg = DiTConfig(hidden_size=256, depth=2, num_heads=4, num_classes=10, learn_sigma=True)
    model = DiT.from_dit_config(cfg).cuda().bfloat16()
    x = torch.randn(2, 4, 2, 16, 16, device="cuda", dtype=torch.bfloat16)
    t, y = torch.rand(2, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
    with sdpa_kernel(backend):
        got = count_flops(forward_backward(model, x, t, y=y), model.flop_parts, fake=fake)
    exact = dit_flops(cfg, 2, 2, 16, 16, backward=True)
    for part, n in exact.items():
        assert got.by_part.get(part, 0) == pytest.approx(n, rel=0.01), part


def test_text_dit_with_padding_mask_on_cuda():
    cfg = DiTConfig(hidden_size=128, depth=2, num_heads=2, text_dim=64)
    model = DiT.from_dit_config(cfg).cuda()
    x, t = torch.randn(2, 4, 3, 8, 8, device="cuda"), torch.rand(2, device="cuda")
    ctx, mask = torch.randn(2, 7, 64, device="cuda"), torch.ones(2, 7, dtype=torch.bool, device="cuda")
    mask[1, 4:] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = count_flops(forward_backward(model, x, t, context=ctx, context_mask=mask), model.flop_parts)
    assert got.total == pytest.approx(sum(dit_flops(cfg, 2, 3, 8, 8, text_len=7, backward=True).values()), rel=0.01)


def test_decoder_prefill_and_decode_on_cuda(tiny_llama):
    model = tiny_llama.cuda().bfloat16()
    shape = DecoderShape.from_hf(model.config)
    ids = torch.randint(0, 300, (1, 96), device="cuda")
    with torch.no_grad():
        prefill = count_flops(lambda: model(ids, logits_to_keep=1), DECODER_PARTS)
        cache = model(ids, use_cache=True).past_key_values
        nxt = torch.randint(0, 300, (1, 1), device="cuda")
        decode = count_flops(lambda: model(nxt, past_key_values=cache), DECODER_PARTS)
    assert prefill.total == pytest.approx(sum(decoder_flops(shape, 96, 0, logits=1).values()), rel=0.01)
    assert decode.total == pytest.approx(sum(decoder_flops(shape, 1, 96).values()), rel=0.01)
