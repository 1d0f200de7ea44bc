"""The sampling pipeline: every mode returns the requested size; guidance; save/load."""

import numpy as np
import pytest
import torch

from model.configs import DiTConfig
from model.diffusion import make_scheduler
from model.dit import DiT
from model.pipeline import MiniStackPipeline
from model.text_encoder import TextEncoder
from model.vae import load_codec


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def _pipe(codec: str, kind: str, encoder) -> MiniStackPipeline:
    torch.manual_seed(0)
    c = load_codec(codec)
    cfg = DiTConfig(
        in_channels=c.latent_channels, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=encoder.dim
    )
    return MiniStackPipeline(DiT.from_dit_config(cfg), make_scheduler(kind), c, encoder)


def _video(frames: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(1, 3, frames, h, w) * 2 - 1


@pytest.mark.parametrize("codec,kind", [("identity", "flow"), ("tiny", "flow"), ("tiny", "ddpm")])
def test_every_mode_returns_the_requested_size(codec, kind, encoder):
    pipe = _pipe(codec, kind, encoder)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    steps = dict(num_inference_steps=2, generator=None)
    t2v = pipe(["a red square moving left", "a blue disc"], frames=5, height=16, width=24, **steps)
    assert t2v.videos.shape == (2, 5, 16, 24, 3) and t2v.videos.dtype == np.uint8
    t2i = pipe("a red square", frames=1, height=16, width=32, **steps)
    assert t2i.videos.shape == (1, 1, 16, 32, 3)
    image = _video(1, 16, 16)[:, :, 0]
    i2v = pipe("a red square", image=image, frames=5, height=16, width=16, generator=g(), num_inference_steps=2)
    assert i2v.videos.shape == (1, 5, 16, 16, 3)
    clip = _video(3, 16, 16)
    for direction in ("forward", "backward"):
        ext = pipe("a red square", video=clip, extend=direction, frames=7, height=16, width=16, **steps)
        assert ext.videos.shape == (1, 7, 16, 16, 3)
    v2v = pipe("a blue square", video=clip, strength=0.5, **steps)
    assert v2v.videos.shape == (1, 3, 16, 16, 3)


def test_given_frames_are_kept(encoder):
    """Image-to-video in pixel space: the first output frame is the given image (to uint8 rounding)."""
    pipe = _pipe("identity", "flow", encoder)
    image = _video(1, 16, 16)
    out = pipe("x", image=image[:, :, 0], frames=4, height=16, width=16, num_inference_steps=3)
    expected = ((image[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(out.videos[0, 0].astype(float) - expected).max() <= 1
    back = pipe("x", video=image, extend="backward", frames=4, height=16, width=16, num_inference_steps=3)
    assert np.abs(back.videos[0, -1].astype(float) - expected).max() <= 1


def test_seeded_sampling_is_reproducible_and_guidance_matters(encoder):
    pipe = _pipe("identity", "flow", encoder)
    with torch.no_grad():  # give the zero-initialised output layers weights, so conditioning shows
        for p in pipe.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def run(scale: float, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        return pipe(
            "a red square",
            frames=1,
            height=16,
            width=16,
            num_inference_steps=3,
            guidance_scale=scale,
            guidance_interval=interval,
            generator=torch.Generator().manual_seed(7),
        ).latents

    assert torch.equal(run(4.0), run(4.0))
    assert not torch.allclose(run(4.0), run(1.0))
    # the guidance interval: the 3 steps sit at noise levels 1, 2/3 and 1/3
    assert torch.allclose(run(4.0, (0.0, 0.2)), run(1.0), atol=1e-3)  # no step inside: unguided (masked padding aside)
    assert torch.allclose(run(4.0, (0.0, 1.0)), run(4.0))
    partly = run(4.0, (0.5, 1.0))  # guided at the first two steps only
    assert not torch.allclose(partly, run(4.0)) and not torch.allclose(partly, run(1.0))
    with pytest.raises(ValueError, match="guidance_interval must be"):
        run(4.0, (0.8, 0.2))


def test_bad_requests_are_clear_errors(encoder):
    pipe = _pipe("tiny", "flow", encoder)
    with pytest.raises(ValueError, match="frames 4 does not fit codec compression 2,4,4 × patch 1,2,2"):
        pipe("x", frames=4, height=16, width=16, num_inference_steps=1)
    with pytest.raises(ValueError, match="strength must be in"):
        pipe("x", video=_video(3, 16, 16), strength=1.5, num_inference_steps=1)
    with pytest.raises(ValueError, match="extend must be one of"):
        pipe("x", video=_video(3, 16, 16), extend="sideways", frames=5, height=16, width=16, num_inference_steps=1)


def test_save_and_load_give_identical_samples(tmp_path, encoder):
    pipe = _pipe("tiny", "flow", encoder)
    pipe.save_pretrained(tmp_path / "pipe")
    back = MiniStackPipeline.from_pretrained(tmp_path / "pipe")

    def sample(p: MiniStackPipeline) -> torch.Tensor:
        return p(
            "a red square",
            frames=3,
            height=16,
            width=16,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(3),
        ).latents

    assert torch.equal(sample(pipe), sample(back))
    with pytest.raises(ValueError, match="not a saved ministack pipeline"):
        MiniStackPipeline.from_pretrained(tmp_path)
