"""The video codec: identity and the tiny causal Wan VAE share one interface; sizes map both ways
with clear errors; latents normalize to unit variance; a saved codec round-trips exactly."""

import json

import pytest
import torch

from model.vae import CODEC_CONFIG, TINY_WAN, VideoCodec, load_codec
from profiling.parts import FROZEN, param_parts


def _video(b, frames, h, w, seed=0):
    return torch.rand(b, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny():
    return load_codec("tiny")


def test_identity_round_trip_is_exact():
    codec = load_codec("identity")
    assert codec.latent_channels == 3 and codec.compression == (1, 1, 1)
    assert codec.latent_size(7, 5, 3) == (7, 5, 3) == codec.video_size(7, 5, 3)
    x = _video(2, 4, 8, 6)
    assert torch.equal(codec.encode(x), x)
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_tiny_is_a_frozen_621k_wan(tiny):
    assert tiny.latent_channels == 4 and tiny.compression == (2, 4, 4)
    n = sum(p.numel() for p in tiny.parameters())
    assert n == 621_111
    assert not any(p.requires_grad for p in tiny.parameters())
    assert param_parts(tiny, VideoCodec.flop_parts)[FROZEN] == n
    assert torch.equal(tiny.shift, torch.zeros(4)) and torch.equal(tiny.scale, torch.ones(4))


def test_tiny_is_seeded():
    a, b = load_codec("tiny"), load_codec("tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "video, latent",
    [
        ((1, 64, 48), (1, 16, 12)),
        ((9, 64, 64), (5, 16, 16)),
        ((3, 16, 16), (2, 4, 4)),
        ((7, 32, 16), (4, 8, 4)),
        ((17, 128, 224), (9, 32, 56)),
    ],
)
def test_size_mapping(tiny, video, latent):
    assert tiny.latent_size(*video) == latent
    assert tiny.video_size(*latent) == video


@pytest.mark.parametrize("frames, h, w", [(1, 16, 12), (3, 16, 16), (5, 8, 24), (7, 16, 8)])
def test_encode_decode_shapes_follow_the_mapping(tiny, frames, h, w):
    """Real VAE outputs agree with latent_size / video_size, images (1 frame) and non-square included;
    3 and 7 frames exercise the padding past Wan's 4-frame encode chunks."""
    x = _video(2, frames, h, w)
    with torch.no_grad():
        z = tiny.encode(x)
        assert z.shape == (2, 4, *tiny.latent_size(frames, h, w))
        y = tiny.decode(z)
    assert y.shape == x.shape
    assert y.min() >= -1 and y.max() <= 1


def test_encoding_is_causal(tiny):
    """A clip's latents are a prefix of a longer clip's: the padding that rescues 3 or 7 frames
    from Wan's 4-frame encode chunks changes nothing."""
    x = _video(1, 9, 16, 16)
    with torch.no_grad():
        full = tiny.encode(x)
        for frames in (1, 3, 5, 7):
            t = tiny.latent_size(frames, 16, 16)[0]
            torch.testing.assert_close(tiny.encode(x[:, :, :frames]), full[:, :, :t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "size, message",
    [
        (
            (8, 64, 64),
            r"frames 8 does not fit codec compression 2,4,4 \(frames 1 \+ 2k.*: 7 frames at 64x64 or 9 frames at 64x64$",
        ),
        ((0, 64, 64), r"frames 0 does not fit.*nearest sizes that fit: 1 frame at 64x64$"),
        (
            (9, 62, 64),
            r"height 62 does not fit.*height and width multiples of 4.*9 frames at 60x64 or 9 frames at 64x64$",
        ),
        ((9, 64, 30), r"width 30 does not fit.*9 frames at 64x28 or 9 frames at 64x32$"),
    ],
)
def test_invalid_sizes_raise_naming_valid_ones(tiny, size, message):
    with pytest.raises(ValueError, match=message):
        tiny.latent_size(*size)
    if size[0] > 0:
        with pytest.raises(ValueError, match=message):
            tiny.encode(torch.zeros(1, 3, *size))


def test_sampling_the_posterior_is_seeded(tiny):
    x = _video(1, 5, 16, 16)
    with torch.no_grad():
        a = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        b = tiny.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        mean = tiny.encode(x)
    assert torch.equal(a, b) and not torch.allclose(a, mean)


@pytest.mark.parametrize("spec", ["identity", "tiny"])
def test_fit_normalization_gives_unit_latents(spec):
    codec = load_codec(spec)
    x = _video(3, 5, 16, 16) * 0.5 + 0.2  # off-centre, so the identity has something to fit
    with torch.no_grad():
        codec.fit_normalization(codec.encode(x))
        z = codec.encode(x)
        std, mean = torch.std_mean(z.transpose(0, 1).flatten(1), dim=1)
        torch.testing.assert_close(mean, torch.zeros(codec.latent_channels), atol=1e-4, rtol=0)
        torch.testing.assert_close(std, torch.ones(codec.latent_channels), atol=1e-4, rtol=0)
        shift, scale = codec.shift.clone(), codec.scale.clone()
        codec.fit_normalization(z)  # fitting on already-normalized latents changes nothing
    torch.testing.assert_close(codec.shift, shift, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codec.scale, scale, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["identity", "tiny"])
def test_save_load_round_trip(spec, tmp_path):
    codec = load_codec(spec)
    x = _video(2, 5, 16, 16)
    with torch.no_grad():
        codec.fit_normalization(codec.encode(x))
        z, y = codec.encode(x), codec.decode(codec.encode(x))
        codec.save_pretrained(tmp_path / "codec")
        meta = json.loads((tmp_path / "codec" / CODEC_CONFIG).read_text())
        assert meta["kind"] == ("identity" if spec == "identity" else "vae")
        if spec == "tiny":
            assert (tmp_path / "codec" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
        for loaded in (load_codec(str(tmp_path / "codec")), VideoCodec.from_pretrained(tmp_path / "codec")):
            assert loaded.compression == codec.compression and loaded.latent_channels == codec.latent_channels
            assert torch.equal(loaded.shift, codec.shift) and torch.equal(loaded.scale, codec.scale)
            assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), y)


def test_plain_diffusers_directory_takes_its_config_normalization(tmp_path):
    from diffusers import AutoencoderKLWan

    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.5, 1.0, 0.5]
    AutoencoderKLWan(**{**TINY_WAN, "latents_mean": mean, "latents_std": std}).save_pretrained(tmp_path)
    codec = load_codec(str(tmp_path))
    assert codec.compression == (2, 4, 4) and codec.latent_channels == 4
    assert codec.shift.tolist() == pytest.approx(mean) and codec.scale.tolist() == pytest.approx(std)


def test_cogvideox_works_where_its_decoder_is_causal():
    """CogVideoX encodes like Wan (1 + 4k frames) but decodes in 2-latent batches, so only odd
    latent lengths decode to 1 + (t-1)*4 frames; the others are refused, not silently wrong."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    codec = VideoCodec(vae)
    assert codec.compression == (4, 4, 4) and codec.scale[0].item() == pytest.approx(1 / 1.15258426)
    with torch.no_grad():
        x = _video(1, 9, 16, 16)
        z = codec.encode(x)
        assert z.shape == (1, 4, 3, 4, 4) and codec.decode(z).shape == x.shape
        with pytest.raises(ValueError, match="decoded 2 latent frames to 8 frames, not 1 \\+ \\(t-1\\)\\*4 = 5"):
            codec.decode(z[:, :, :2])


def test_unknown_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected 'identity', 'tiny', or a directory"):
        load_codec(str(tmp_path / "nowhere"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["identity", "tiny"])
def test_follows_the_module_to_cuda(spec):
    codec = load_codec(spec)
    x = _video(2, 5, 16, 16)
    with torch.no_grad():
        z_cpu = codec.encode(x)
        codec.to("cuda")
        z = codec.encode(x)  # a CPU video is moved to the codec's device
        y = codec.decode(z)
    assert z.device.type == y.device.type == "cuda" and y.shape == x.shape
    torch.testing.assert_close(z.cpu(), z_cpu, atol=1e-2, rtol=1e-2)
