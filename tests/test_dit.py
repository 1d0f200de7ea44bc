"""The DiT: patches round trip, any grid size, save/load, and it learns (overfits one clip)."""

import itertools

import pytest
import torch

from model.diffusion import training_loss
from model.dit import DiT, DiTConfig
from model.patches import apply_rope, patch_grid, patchify, rope_3d, unpatchify

SIZES = [(1, 8, 8), (1, 6, 10), (1, 2, 16), (3, 4, 4), (4, 8, 6), (8, 2, 2), (5, 12, 4), (2, 14, 6)]
PATCHES = [(1, 1, 1), (1, 2, 2), (1, 2, 1)]


@pytest.mark.parametrize("patch", PATCHES + [(2, 2, 2)])
def test_patchify_unpatchify_round_trip(patch):
    for t, h, w in SIZES:
        if any(s % p for s, p in zip((t, h, w), patch)):
            with pytest.raises(ValueError, match="does not fit patch"):
                patchify(torch.zeros(1, 3, t, h, w), patch)
            continue
        x = torch.randn(2, 3, t, h, w)
        tokens = patchify(x, patch)
        grid = patch_grid(patch, t, h, w)
        assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch[0] * patch[1] * patch[2])
        assert torch.equal(unpatchify(tokens, patch, grid), x)


def test_token_order_matches_the_patch_embedding():
    """The Conv3d patch embedding is a linear map of exactly the values `patchify` groups."""
    cfg = DiTConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=16, depth=1, num_heads=2)
    model = DiT.from_dit_config(cfg)
    x = torch.randn(1, 3, 2, 6, 4)
    conv = model.x_embedder(x).flatten(2).transpose(1, 2)
    w = model.x_embedder.weight.permute(0, 2, 3, 4, 1).reshape(16, -1)  # (pt, ph, pw, C) order
    assert torch.allclose(conv, patchify(x, cfg.patch_size) @ w.T + model.x_embedder.bias, atol=1e-5)


@pytest.mark.parametrize(
    "attention,positions", [("full", "sincos"), ("factorized", "sincos"), ("full", "rope"), ("factorized", "rope")]
)
def test_any_grid_size_gives_the_same_size_back(attention, positions):
    torch.manual_seed(0)
    cfg = DiTConfig(
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=32,
        depth=2,
        num_heads=2,
        text_dim=8,
        attention=attention,
        positions=positions,
        qk_norm=positions == "rope",
    )
    model = DiT.from_dit_config(cfg)
    for t, h, w in itertools.islice(((t, h, w) for t, h, w in SIZES if h % 2 == 0 and w % 2 == 0), 6):
        out = model(torch.randn(2, 4, t, h, w), torch.rand(2), context=torch.randn(2, 3, 8))
        assert out.shape == (2, 4, t, h, w)


def test_padded_text_tokens_are_ignored():
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=8)
    model = DiT.from_dit_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # the zero-initialised cross-attention output must speak
    x, t, ctx = torch.randn(1, 4, 1, 4, 4), torch.rand(1), torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, True, False, False]])
    garbage = ctx.clone()
    garbage[:, 3:] = 100.0
    a = model(x, t, context=ctx, context_mask=mask)
    assert torch.allclose(a, model(x, t, context=garbage, context_mask=mask), atol=1e-5)
    assert not torch.allclose(a, model(x, t, context=garbage), atol=1e-3)


def test_rope_scores_depend_only_on_the_offset_between_tokens():
    torch.manual_seed(0)
    grid = (3, 4, 5)
    cos, sin = rope_3d(16, grid, torch.device("cpu"))
    q, k = torch.randn(16), torch.randn(16)

    def score(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
        i, j = (t * 20 + h * 5 + w for t, h, w in (a, b))
        return float((apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum())

    assert score((0, 0, 0), (1, 2, 3)) == pytest.approx(score((1, 1, 1), (2, 3, 4)), abs=1e-4)
    assert score((0, 0, 0), (1, 2, 3)) != pytest.approx(score((0, 0, 0), (1, 3, 2)), abs=1e-3)
    assert torch.allclose(apply_rope(q, cos[7], sin[7]).norm(), q.norm())  # a rotation
    with pytest.raises(ValueError, match="head width 9 must be even"):
        DiTConfig(hidden_size=18, num_heads=2, positions="rope")


def test_factorized_rope_gives_each_frame_and_column_its_own_positions():
    """The spatial pass must rotate by (h, w) within each frame and the temporal pass by t within
    each column: compare the block's factorized attention with a loop over frames and columns."""
    torch.manual_seed(0)
    cfg = DiTConfig(
        in_channels=4, hidden_size=32, depth=1, num_heads=2, attention="factorized", positions="rope", qk_norm=True
    )
    block = DiT.from_dit_config(cfg).blocks[0]
    b, grid = 2, (3, 2, 4)
    h = torch.randn(b, 3 * 2 * 4, 32)
    cos, sin = rope_3d(16, grid, torch.device("cpu"))
    got = block._self_attention(h, grid, (cos, sin))
    video, c4, s4 = h.view(b, 3, 8, 32), cos.view(3, 8, 16), sin.view(3, 8, 16)
    spatial = torch.stack([block.attn(video[:, t], rope=(c4[t], s4[t])) for t in range(3)], dim=1)
    temporal = torch.stack([block.temporal_attn(spatial[:, :, s], rope=(c4[:, s], s4[:, s])) for s in range(8)], dim=2)
    assert torch.allclose(got, temporal.reshape(b, 24, 32), atol=1e-5)


def test_save_and_load_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = DiTConfig(
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        text_dim=8,
        attention="factorized",
        qk_norm=True,
        positions="rope",
    )
    model = DiT.from_dit_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    back = DiT.from_pretrained(tmp_path)
    assert back.cfg == cfg
    x, t, ctx = torch.randn(2, 4, 3, 4, 6), torch.rand(2), torch.randn(2, 3, 8)
    assert torch.equal(model(x, t, context=ctx), back(x, t, context=ctx))


def test_overfits_one_clip():
    """A small model memorises one clip: the loss at fixed timesteps and noise falls by >= 10x."""
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=64, depth=2, num_heads=4, text_dim=16)
    model = DiT.from_dit_config(cfg)
    clip = -torch.ones(1, 3, 4, 16, 16)
    for f in range(4):  # a white square moving right
        clip[0, :, f, 4:8, 2 + 3 * f : 6 + 3 * f] = 1.0
    x0, ctx = clip.expand(8, -1, -1, -1, -1), torch.randn(1, 5, 16).expand(8, -1, -1)
    fixed_t, fixed_noise = (
        torch.linspace(100, 900, 8),
        torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)),
    )

    def val() -> float:
        with torch.no_grad():
            return training_loss(model, x0, "flow", timestep=fixed_t, noise=fixed_noise, context=ctx).item()

    before, g = val(), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    for _ in range(300):
        loss = training_loss(model, x0, "flow", generator=g, context=ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert val() < before / 10


def test_ddpm_objective_trains_eps_half_of_learned_sigma():
    cfg = DiTConfig(in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3, learn_sigma=True)
    model = DiT.from_dit_config(cfg)
    x0 = torch.randn(2, 4, 1, 4, 4)
    loss = training_loss(model, x0, "ddpm", generator=torch.Generator().manual_seed(0), y=torch.tensor([0, 2]))
    loss.backward()
    assert loss.item() > 0 and model.final_layer.linear.weight.grad is not None
    with pytest.raises(ValueError, match="unknown diffusion kind"):
        training_loss(model, x0, "score", y=torch.tensor([0, 2]))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DiT.from_dit_config(DiTConfig(hidden_size=32, depth=2, num_heads=2, text_dim=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, ctx = torch.randn(2, 4, 3, 4, 4), torch.rand(2), torch.randn(2, 3, 8)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x, t, context=ctx).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads()))


def test_pooled_text_steers_the_modulation_and_ignores_padding():
    torch.manual_seed(0)
    model = DiT.from_dit_config(DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=8, pooled_text=True))
    t = torch.tensor([500.0, 500.0])
    ctx, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, True, True]])
    c = model.t_embedder(t) + model.text_pool(torch.stack([ctx[0, :2].mean(0), ctx[1].mean(0)]))
    ctx_padded = ctx.clone()
    ctx_padded[0, 2] = 100.0  # a padding token's state must not move the pooled caption
    from model.dit import pooled

    assert torch.allclose(model.t_embedder(t) + model.text_pool(pooled(ctx_padded, mask)), c)
    assert not torch.allclose(model.text_pool(pooled(ctx, mask))[0], model.text_pool(pooled(ctx, mask))[1])


def test_data_target_is_trained_on_the_velocity_it_implies():
    """A DiT with target='data' predicts x0; its flow loss is the velocity error, |x0 - x0_hat|^2 / sigma^2."""
    from model.diffusion import native_output

    torch.manual_seed(0)
    model = DiT.from_dit_config(DiTConfig(hidden_size=32, depth=1, num_heads=2, target="data"))
    x0, noise = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 1, 4, 4)
    t = torch.tensor([250.0, 800.0])
    sigma = (t / 1000).view(2, 1, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * noise
    x0_hat = model(xt, t)
    expected = ((x0 - x0_hat) / sigma).square().flatten(1).mean(1)
    got = training_loss(model, x0, "flow", timestep=t, noise=noise, per_sample=True)
    assert torch.allclose(got, expected, rtol=1e-4)
    assert torch.allclose(
        native_output(x0, xt, t, "data"), noise - x0, atol=1e-5
    )  # the true x0 gives the true velocity
    with pytest.raises(ValueError, match="flow"):
        training_loss(model, x0, "ddpm")
    with pytest.raises(ValueError, match="target"):
        DiTConfig(target="eps")


def test_flow_sigmas_logit_normal_uniform_and_shifted():
    from model.diffusion import flow_sigmas

    g = torch.Generator().manual_seed(0)
    logit = flow_sigmas(20_000, g)
    uniform = flow_sigmas(20_000, g, "uniform")
    shifted = flow_sigmas(20_000, g, "logit_normal", shift=3.0)
    assert 0 < logit.min() and logit.max() < 1 and abs(logit.median() - 0.5) < 0.02
    assert abs(uniform.mean() - 0.5) < 0.01 and abs((uniform < 0.1).float().mean() - 0.1) < 0.01
    assert (logit < 0.1).float().mean() < 0.03  # logit-normal rarely draws the ends of the path
    assert abs(shifted.median() - 0.75) < 0.02  # SD3's shift k moves the median 1/2 to k / (k + 1)
    with pytest.raises(ValueError, match="unknown sigma sampling 'cosine'"):
        flow_sigmas(4, g, "cosine")
