"""Measured FLOPs (ops that ran, forward and backward) against the exact formulas."""

import pytest
import torch
import torch.nn.functional as F

from model.configs import PRESETS
from model.dit import DiT, DiTConfig
from model.flops.formula import dit_flops
from profiling.formulas.llama import DECODER_PARTS, DecoderShape, decoder_flops
from profiling.measure import FlopMeter, count_flops, deepspeed_forward_flops, forward_backward
from profiling.parts import param_parts


def _close(measured: dict, exact: dict, rel: float = 0.01) -> None:
    """Within 1% in total and in every part (a part may differ by 1% of the total: e.g. the
    rotary-angle matmul that some transformers versions run, a few hundred FLOPs)."""
    total = sum(exact.values())
    assert sum(measured.values()) == pytest.approx(total, rel=rel)
    for part in set(measured) | set(exact):
        assert measured.get(part, 0) == pytest.approx(exact.get(part, 0), rel=rel, abs=rel * total), part


def _dit_inputs(cfg: DiTConfig, batch: int, latent: tuple, text_len: int) -> tuple[tuple, dict]:
    x, t = torch.randn(batch, cfg.in_channels, *latent), torch.rand(batch)
    kwargs = {}
    if cfg.text_dim:
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        mask[0, text_len // 2 :] = False  # padded caption
        kwargs = {"context": torch.randn(batch, text_len, cfg.text_dim), "context_mask": mask}
    if cfg.num_classes:
        kwargs["y"] = torch.zeros(batch, dtype=torch.long)
    return (x, t), kwargs


DIT_CASES = [
    (DiTConfig(hidden_size=64, depth=2, num_heads=4, text_dim=32), 2, (3, 8, 6), 5),
    (DiTConfig(hidden_size=64, depth=2, num_heads=4, text_dim=32, attention="factorized"), 2, (4, 6, 10), 7),
    (
        DiTConfig(
            in_channels=3, patch_size=(2, 2, 2), hidden_size=48, depth=1, num_heads=3, num_classes=10, learn_sigma=True
        ),
        1,
        (4, 8, 8),
        0,
    ),
    (DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=16), 3, (1, 16, 4), 3),  # image, 4:1 aspect
    (DiTConfig(hidden_size=32, depth=2, num_heads=2, text_dim=16, pooled_text=True), 2, (3, 8, 8), 4),  # pooled caption
]


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("cfg,batch,latent,text_len", DIT_CASES)
def test_dit_measured_matches_exact(cfg, batch, latent, text_len, fake):
    torch.manual_seed(0)
    model = DiT.from_dit_config(cfg)

    def forward():
        args, kwargs = _dit_inputs(cfg, batch, latent, text_len)
        return model(*args, **kwargs)

    def train():
        args, kwargs = _dit_inputs(cfg, batch, latent, text_len)
        return forward_backward(model, *args, **kwargs)()

    fwd = count_flops(forward, model.flop_parts, fake=fake)
    _close(fwd.by_part, dit_flops(cfg, batch, *latent, text_len=text_len))
    trn = count_flops(train, model.flop_parts, fake=fake)
    _close(trn.by_part, dit_flops(cfg, batch, *latent, text_len=text_len, backward=True))
    assert trn.total > 2.5 * fwd.total


def test_fake_counting_leaves_real_model_untouched():
    torch.manual_seed(0)
    cfg = DIT_CASES[0][0]
    model = DiT.from_dit_config(cfg)
    args, kwargs = _dit_inputs(cfg, 2, (3, 8, 6), 5)
    before = model(*args, **kwargs)
    count_flops(forward_backward(model, *args, **kwargs), model.flop_parts, fake=True)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(*args, **kwargs), before)


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_decoder_prefill_and_decode_match_exact(tiny_llama, fake):
    shape = DecoderShape.from_hf(tiny_llama.config)
    for prompt in (1, 37, 128):
        ids = torch.randint(0, 300, (1, prompt))
        with torch.no_grad():
            got = count_flops(lambda: tiny_llama(ids, logits_to_keep=1), DECODER_PARTS, fake=fake)  # noqa: B023 (called at once, inside the iteration)
        _close(got.by_part, decoder_flops(shape, prompt, 0, logits=1))
    # decode: one token over a real KV cache of 37 tokens, logits at that position
    with torch.no_grad():
        cache = tiny_llama(torch.randint(0, 300, (1, 37)), use_cache=True).past_key_values
        nxt = torch.randint(0, 300, (1, 1))
        got = count_flops(lambda: tiny_llama(nxt, past_key_values=cache), DECODER_PARTS, fake=fake)
    _close(got.by_part, decoder_flops(shape, 1, 37))


def test_decoder_training_step_matches_exact(tiny_llama):
    shape = DecoderShape.from_hf(tiny_llama.config)
    ids = torch.randint(0, 300, (2, 24))
    got = count_flops(forward_backward(tiny_llama, ids), DECODER_PARTS)
    exact = {k: 2 * v for k, v in decoder_flops(shape, 24, backward=True).items()}
    _close(got.by_part, exact)


def test_decoder_param_parts_tied_embeddings(tiny_llama):
    parts = param_parts(tiny_llama, DECODER_PARTS)
    assert parts["embedding"] == 300 * 64  # counted once though the lm-head shares it
    assert parts["lm_head"] == 0
    assert sum(parts.values()) == sum(p.numel() for p in tiny_llama.parameters())


def test_cpu_sdpa_is_counted_not_zero():
    """Stock FlopCounterMode counts CPU flash SDPA as 0; ours must not, and must honour is_causal."""
    q = k = v = torch.randn(1, 2, 16, 8)
    dense = count_flops(lambda: F.scaled_dot_product_attention(q, k, v)).total
    causal = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)).total
    assert dense == 2 * 2 * 16 * 16 * 16
    assert causal == 2 * 2 * (16 * 17 // 2) * 16
    qg = q.clone().requires_grad_()
    fb = count_flops(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qg, k, v).sum(), qg)).total
    assert fb == 3 * dense


def test_flop_meter_counts_each_shape_once():
    cfg = DIT_CASES[0][0]
    model = DiT.from_dit_config(cfg)
    meter = FlopMeter(model.flop_parts)
    calls = []

    def step(latent):
        def fn():
            calls.append(latent)
            args, kwargs = _dit_inputs(cfg, 2, latent, 5)
            return model(*args, **kwargs)

        return fn

    for latent in [(3, 8, 6), (3, 8, 6), (1, 8, 8), (3, 8, 6)]:
        got = meter.count(latent, step(latent))
        assert got.total == sum(dit_flops(cfg, 2, *latent, text_len=5).values())
    assert calls == [(3, 8, 6), (1, 8, 8)] and len(meter) == 2


def test_dit_paper_configs_params_and_gflops():
    """Peebles & Xie 2022, Table 4 (params in M; 'Gflops' are multiply-adds at 256x256)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    paper = {
        "dit-s-2": (33, 6.06),
        "dit-b-2": (130, 23.01),
        "dit-l-2": (458, 80.71),
        "dit-xl-2": (675, 118.64),
        "dit-s-4": (33, 1.41),
        "dit-b-4": (130, 5.56),
        "dit-l-4": (458, 19.70),
        "dit-xl-4": (675, 29.05),
        "dit-s-8": (33, 0.36),
        "dit-b-8": (130, 1.42),
        "dit-l-8": (458, 5.01),
        "dit-xl-8": (675, 7.39),
    }
    for name, (mparams, gflops) in paper.items():
        cfg = PRESETS[name]
        with FakeTensorMode():
            model = DiT.from_dit_config(cfg)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(mparams, rel=0.01), name
        macs = sum(dit_flops(cfg, 1, 1, 32, 32).values()) / 2e9
        assert macs == pytest.approx(gflops, rel=0.01), name


def test_deepspeed_profiler_cross_check():
    """DeepSpeed's profiler counts the forward (plus norms/activations): within a few % of ours."""
    torch.manual_seed(0)
    cfg = DiTConfig(hidden_size=64, depth=2, num_heads=4, text_dim=32)
    model = DiT.from_dit_config(cfg).eval()
    args, kwargs = _dit_inputs(cfg, 2, (2, 8, 8), 5)
    ours = count_flops(lambda: model(*args, **kwargs)).total
    ds = deepspeed_forward_flops(model, lambda: model(*args, **kwargs))
    assert ours <= ds <= 1.05 * ours
