"""The video compression network: pixels <-> the latent the DiT diffuses in.

    video [B, 3, T, H, W] in [-1, 1]
      -> causal 3D VAE encoder (diffusers' AutoencoderKLWan)    T -> 1 + (T-1)/ct, H -> H/cs, W -> W/cs
         or identity (pixel space, for quick runs)
      -> (z - shift) / scale, per channel                      ~unit variance for the diffusion model
    latent [B, C, t, h, w]                                      decode: the inverse, clamped to [-1, 1]

Causal in time: the first frame is encoded on its own and every later latent frame sees only
frames up to its own, so an image is a 1-frame video and images and videos share one latent
space (Sora trains on both; Wan and CogVideoX use the same design). "tiny" is a 621K-parameter
Wan (ct = 2, cs = 4, 4 channels) that trains on a CPU; a pretrained Wan, HunyuanVideo or
CogVideoX directory loads through the same interface. The codec is frozen as built (the DiT trains on its output);
the stage that trains the VAE itself unfreezes `codec.vae`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from model.sizes import SizeRule
from profiling.parts import FROZEN, PartRules

TINY_WAN = dict(
    base_dim=16,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,  # diffusers' defaults are 16 long (the released z_dim)
    scale_factor_temporal=2,
    scale_factor_spatial=4,  # read by diffusers' tiling; defaults are Wan 2.1's 4, 8
)
CODEC_CONFIG = "codec.json"

# Wan's encode walks the frames after the first in chunks of 4 (its released ct) and silently
# drops a remainder: with ct = 2, 7 frames would lose the last two. Causality makes a fix exact:
# repeat the last frame up to a whole chunk, encode, keep the first t latents (they never see it).
ENCODE_CHUNK = 4


def _compression(config) -> tuple[int, int, int]:
    """(ct, ch, cw) of a diffusers video VAE, from the architecture its config describes."""
    if "temperal_downsample" in config:  # Wan (diffusers' spelling); scale_factor_* may be left at defaults
        cs = 2 ** len(config["temperal_downsample"]) * (config.get("patch_size") or 1)
        return 2 ** sum(config["temperal_downsample"]), cs, cs
    if "temporal_compression_ratio" in config:  # CogVideoX, HunyuanVideo
        cs = config.get("spatial_compression_ratio") or 2 ** (len(config["block_out_channels"]) - 1)
        return int(config["temporal_compression_ratio"]), cs, cs
    raise ValueError(f"unsupported VAE {config.get('_class_name')}: expected a causal video VAE (Wan, CogVideoX)")


def _config_normalization(config, channels: int) -> tuple[list[float], list[float]]:
    """The latent shift/scale a diffusers VAE's config ships: Wan's per-channel latents_mean/std,
    or the single scaling_factor (and shift_factor) of CogVideoX-style VAEs."""
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return list(config["latents_mean"]), list(config["latents_std"])
    shift, factor = config.get("shift_factor") or 0.0, config.get("scaling_factor") or 1.0
    return [shift] * channels, [1.0 / factor] * channels


def _load_vae(path: Path) -> nn.Module:
    """A diffusers VAE directory, whatever its class (named in its config.json)."""
    import diffusers

    name = json.loads((path / "config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None) if name.startswith("Autoencoder") else None
    if cls is None:
        raise ValueError(f"{path}/config.json does not name a diffusers autoencoder (_class_name = {name!r})")
    return cls.from_pretrained(path, local_files_only=True)


class VideoCodec(nn.Module):
    """Encode videos to normalized latents and back; identity when built without a VAE."""

    # A frozen encoder for FLOP accounting: forward only, outside the trained N (profiling.parts).
    flop_parts: PartRules = ((r".*", FROZEN),)
    latent_channels: int
    compression: tuple[int, int, int]  # (t, h, w)

    def __init__(self, vae: nn.Module | None = None) -> None:
        super().__init__()
        self.vae = vae
        if vae is None:
            self.latent_channels, self.compression = 3, (1, 1, 1)
            shift, scale = [0.0] * 3, [1.0] * 3
        else:
            self.latent_channels = vae.config.get("z_dim") or vae.config["latent_channels"]
            self.compression = _compression(vae.config)
            shift, scale = _config_normalization(vae.config, self.latent_channels)
            vae.requires_grad_(False).eval()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the latent of a video; a SizeError naming the nearest sizes this codec takes if it cannot."""
        return SizeRule(self.compression).latent((frames, height, width))

    def video_size(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """(frames, height, width) that a latent of size (t, h, w) decodes to."""
        ct, ch, cw = self.compression
        return 1 + (t - 1) * ct, h * ch, w * cw

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:  # [C] -> broadcastable over [B, C, t, h, w]
        return self.shift[:, None, None, None], self.scale[:, None, None, None]

    def encode(
        self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalized latents [B, C, t, h, w]. sample=True draws
        from the VAE's posterior (training-time augmentation); False takes its mean."""
        shift, scale = self._stats()
        if self.vae is None:
            self.latent_size(*video.shape[2:])
            return (video.to(shift.device) - shift) / scale
        posterior, t = self.posterior(video)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z[:, :, :t] - shift) / scale

    def posterior(self, video: torch.Tensor):
        """The VAE's (unnormalized) posterior over the latents of `video`, and the number t of its
        latent frames that belong to the video (the rest encode the padding Wan's chunking needs)."""
        t = self.latent_size(*video.shape[2:])[0]
        x = video.to(device=self.shift.device, dtype=self.vae.dtype)
        pad = -(x.shape[2] - 1) % ENCODE_CHUNK
        if pad:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        return self.vae.encode(x).latent_dist, t

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, t, h, w] -> video [B, 3, T, H, W] clamped to [-1, 1]."""
        shift, scale = self._stats()
        z = latents.to(shift.device) * scale + shift
        if self.vae is not None:
            z = self.vae.decode(z.to(self.vae.dtype)).sample
            frames = self.video_size(*latents.shape[2:])[0]
            if z.shape[2] != frames:  # CogVideoX decodes in 2-latent batches: right only for odd t
                raise ValueError(
                    f"{type(self.vae).__name__} decoded {latents.shape[2]} latent frames to {z.shape[2]} frames, "
                    f"not 1 + (t-1)*{self.compression[0]} = {frames}: use a latent length it supports"
                )
        return z.clamp(-1, 1)

    @torch.no_grad()
    def fit_normalization(self, latents: torch.Tensor) -> None:
        """Set shift/scale to the per-channel mean/std of a batch of latents as `encode` returned
        them (normalized with the current stats, which are undone first), so that encoding that
        batch again gives mean 0 and std 1 per channel."""
        shift, scale = self._stats()
        raw = (latents.to(shift.device).float() * scale + shift).transpose(0, 1).flatten(1)
        std, mean = torch.std_mean(raw, dim=1)
        self.shift.copy_(mean)
        self.scale.copy_(std.clamp_min(1e-6))

    def save_pretrained(self, directory: str | Path) -> None:
        """codec.json (kind, shift, scale: float32 values round-trip JSON exactly) and, for a VAE,
        its own diffusers save_pretrained (safetensors) in vae/."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        meta = {
            "kind": "identity" if self.vae is None else "vae",
            "shift": self.shift.tolist(),
            "scale": self.scale.tolist(),
        }
        (directory / CODEC_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VideoCodec:
        """The codec a save_pretrained wrote to `directory`."""
        directory = Path(directory)
        meta = json.loads((directory / CODEC_CONFIG).read_text())
        codec = cls(None if meta["kind"] == "identity" else _load_vae(directory / "vae"))
        codec.shift.copy_(torch.tensor(meta["shift"]))
        codec.scale.copy_(torch.tensor(meta["scale"]))
        return codec


def _unknown_codec(spec: str) -> ValueError:
    return ValueError(
        f"codec {spec!r}: expected 'identity', 'tiny', or a directory holding {CODEC_CONFIG} (a saved VideoCodec) "
        "or config.json (a diffusers VAE)"
    )


def load_codec(spec: str) -> VideoCodec:
    """The codec a spec names: "identity"; "tiny" (a fresh, seeded, untrained tiny Wan); or a local
    directory: a saved VideoCodec (codec.json) or a plain diffusers VAE (config.json; its
    normalization then comes from that config)."""
    if spec == "identity":
        return VideoCodec()
    if spec == "tiny":
        from diffusers import AutoencoderKLWan

        with torch.random.fork_rng(devices=[]):  # same weights every time, caller's RNG untouched
            torch.manual_seed(0)
            return VideoCodec(AutoencoderKLWan(**TINY_WAN))
    path = Path(spec)
    if (path / CODEC_CONFIG).is_file():
        return VideoCodec.from_pretrained(path)
    if (path / "config.json").is_file():
        return VideoCodec(_load_vae(path))
    raise _unknown_codec(spec)


def codec_compression(spec: str) -> tuple[int, int, int]:
    """(ct, ch, cw) of the codec `load_codec(spec)` would give, read from its configs alone (no
    weights load), so that a size it cannot take is refused before anything is built."""
    if spec in ("identity", "tiny"):
        return (1, 1, 1) if spec == "identity" else _compression(TINY_WAN)
    path = Path(spec)
    if (path / CODEC_CONFIG).is_file():
        if json.loads((path / CODEC_CONFIG).read_text())["kind"] == "identity":
            return 1, 1, 1
        path = path / "vae"
    if (path / "config.json").is_file():
        return _compression(json.loads((path / "config.json").read_text()))
    raise _unknown_codec(spec)
