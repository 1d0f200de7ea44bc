"""Sampling: the diffusers pipeline around the DiT, in every mode, with classifier-free guidance.

    prompt -> frozen text encoder -> tokens + mask ---------------------------.
    noise [B, C, t, h, w] (its size sets the output size) -> DiT x steps -> codec.decode -> video

Modes, all from one denoising loop:
- text -> video, text -> image (frames=1);
- image -> video: the first frame is given;
- extend a video forward or backward in time: its frames are given at the start or the end;
- video -> video (SDEdit): start from the input video noised to `strength` instead of noise.
Given frames are imposed by replacement: at every step the known latent frames are set to the
encoded input noised to the current level (as in RePaint / SDEdit), so a model trained only
to denoise whole clips does all of it, with no conditioning-specific training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from model.diffusion import TRAIN_STEPS, add_noise, kind_of, make_scheduler, native_output, prediction, target_of
from model.dit import DiT
from model.sizes import SizeRule
from model.text_encoder import TextEncoder
from model.vae import VideoCodec, codec_compression

EXTEND = ("forward", "backward")


@dataclass
class SampleOutput:
    videos: np.ndarray  # [B, T, H, W, 3] uint8
    latents: torch.Tensor  # [B, C, t, h, w]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, H, W, 3] uint8."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def _pad_cat(a: torch.Tensor, b: torch.Tensor, value: float | bool) -> torch.Tensor:
    """Concatenate two [B, L, ...] batches whose L differ, padding the shorter one."""
    length = max(a.shape[1], b.shape[1])
    pad = lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]), value=value)  # noqa: E731
    return torch.cat([pad(a), pad(b)])


def _first_half(cond: dict, b: int) -> dict:
    """The conditional half of guided model kwargs (`_condition` puts it first)."""
    return {k: v[:b] for k, v in cond.items()}


def _saved(path: str | Path) -> Path:
    """`path` as a Path, if it holds a saved pipeline (pipeline.json); else a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory (a saved pipeline is a directory, e.g. RUN_DIR/pipeline)")
    if not (path / "pipeline.json").is_file():
        raise ValueError(f"{path} is not a saved ministack pipeline (no pipeline.json)")
    return path


class MiniStackPipeline(DiffusionPipeline):
    def __init__(self, transformer: DiT, scheduler, codec: VideoCodec, text_encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, codec=codec, text_encoder=text_encoder)

    @classmethod
    def build(
        cls, config: str = "tiny", codec: str = "tiny", kind: str = "flow", text_encoder: str | None = None
    ) -> MiniStackPipeline:
        """A fresh (untrained) pipeline: a DiT preset or YAML sized to the codec's latent channels
        and the text encoder's width (None = the shipped MiniLM), and a flow or ddpm scheduler."""
        from dataclasses import replace

        from model.configs import load_config
        from model.vae import load_codec

        codec_ = load_codec(codec)
        cfg = load_config(config)
        encoder = TextEncoder(text_encoder) if cfg.text_dim else None
        cfg = replace(cfg, in_channels=codec_.latent_channels, text_dim=encoder.dim if encoder else 0)
        return cls(DiT.from_dit_config(cfg), make_scheduler(kind), codec_, encoder)

    @staticmethod
    def build_size_rule(config: str = "tiny", codec: str = "tiny") -> SizeRule:
        """The sizes `build(config, codec)` would take, from the configs alone (nothing is built)."""
        from model.configs import load_config

        return SizeRule(codec_compression(codec), load_config(config).patch_size)

    @staticmethod
    def saved_size_rule(path: str | Path) -> SizeRule:
        """The sizes the pipeline saved in `path` takes, from its configs alone (no weights load),
        so that a size it cannot take is refused before anything loads."""
        path = _saved(path)
        patch = json.loads((path / "transformer" / "config.json").read_text())["patch_size"]
        return SizeRule(codec_compression(str(path / "codec")), patch)

    @property
    def size_rule(self) -> SizeRule:
        """The video sizes this pipeline samples: its codec's compression times its DiT's patch."""
        return SizeRule(self.codec.compression, self.transformer.cfg.patch_size)

    @property
    def device(self) -> torch.device:
        """The transformer's device (diffusers' own lookup expects every component to be a
        diffusers model; the codec and text encoder are plain modules)."""
        return next(self.transformer.parameters()).device

    def to(self, *args, **kwargs) -> MiniStackPipeline:
        """Move / cast every module (diffusers' version, like `device`, wants diffusers models)."""
        for module in (self.transformer, self.codec, self.text_encoder):
            if module is not None:
                module.to(*args, **kwargs)
        return self

    # -- conditioning -------------------------------------------------------------------------
    def _condition(self, prompts: list[str], negative: str, class_labels, guided: bool) -> dict:
        """Model kwargs for the conditional half and (when guided) the unconditional half."""
        cfg = self.transformer.cfg
        if cfg.num_classes:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels")
            y = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
            return {"y": torch.cat([y, torch.full_like(y, cfg.num_classes)]) if guided else y}
        if self.text_encoder is None:
            raise ValueError("this model is text-conditional but the pipeline has no text encoder")
        ctx, mask = self.text_encoder(prompts)
        if guided:
            neg_ctx, neg_mask = self.text_encoder([negative] * len(prompts))
            ctx, mask = _pad_cat(ctx, neg_ctx, 0.0), _pad_cat(mask, neg_mask, False)
        return {"context": ctx, "context_mask": mask}

    def _known(self, image, video, extend, b: int, t: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encoded given frames and a [t] bool mask of which latent frames they fill."""
        if image is not None:
            image = image if image.dim() == 5 else (image[None] if image.dim() == 3 else image)[:, :, None]
            video, extend = image, "forward"
        if video is None or extend is None:
            return None, None
        if extend not in EXTEND:
            raise ValueError(f"extend must be one of {EXTEND}, got {extend!r}")
        z = self.codec.encode(video.to(self.device)).expand(b, -1, -1, -1, -1)
        if z.shape[2] >= t:
            raise ValueError(f"the given clip fills {z.shape[2]} latent frames; ask for more frames than it has")
        known = torch.zeros(t, dtype=torch.bool, device=self.device)
        if extend == "forward":
            known[: z.shape[2]] = True
        else:
            known[t - z.shape[2] :] = True
        return z, known

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str = "",
        frames: int = 1,
        height: int = 32,
        width: int = 32,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None,
        image: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        extend: str | None = None,
        strength: float | None = None,
        class_labels=None,
    ) -> SampleOutput:
        """Sample a batch. `image` [B?, 3, H, W] and `video` [B, 3, T, H, W] are in [-1, 1].
        `video` with `extend` extends it; `video` with `strength` in (0, 1] is SDEdit.
        `guidance_interval` (lo, hi): guidance applies only at the steps whose time t/T (flow: the
        noise level sigma) lies in [lo, hi], the others run the conditional branch alone
        (Kynkaanniemi et al. 2024: guidance at the highest noise levels costs diversity and
        fidelity, near the end it does little)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if class_labels is not None:
            prompts = [""] * len(torch.as_tensor(class_labels).reshape(-1))
        if strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if strength is not None and (video is None or extend is not None):
            raise ValueError("strength (SDEdit) needs `video` and no `extend`")
        if strength is not None:
            frames, height, width = video.shape[2:]
        b, c = len(prompts), self.codec.latent_channels
        t, h, w = self.size_rule.latent((frames, height, width))
        lo, hi = guidance_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        guided = guidance_scale != 1.0
        z_known, known = self._known(image, video, extend, b, t)  # first: the codec refuses a clip it cannot take
        cond = self._condition(prompts, negative_prompt, class_labels, guided)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        noise = torch.randn((b, c, t, h, w), generator=generator, device=generator.device if generator else "cpu").to(
            self.device
        )
        x = noise if kind_of(self.scheduler) == "flow" else noise * self.scheduler.init_noise_sigma
        if strength is not None:  # SDEdit: skip the first (1 - strength) of the path
            timesteps = timesteps[int(len(timesteps) * (1 - strength)) :]
            x = add_noise(self.scheduler, self.codec.encode(video.to(self.device)), noise, timesteps[:1].repeat(b))
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(len(self.scheduler.timesteps) - len(timesteps))

        for step in self.progress_bar(timesteps):
            if known is not None:
                x[:, :, known] = add_noise(self.scheduler, z_known, noise[:, :, known], step.repeat(b))
            guide_now = guided and lo <= float(step) / TRAIN_STEPS <= hi
            x_in = torch.cat([x, x]) if guide_now else x
            t_in = step.repeat(x_in.shape[0])
            kwargs = cond if guide_now or not guided else _first_half(cond, b)
            out = native_output(
                prediction(self.transformer(x_in, t_in, **kwargs), c), x_in, t_in, target_of(self.transformer)
            )
            if guide_now:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x = self.scheduler.step(out, step, x).prev_sample
        if known is not None:
            x[:, :, known] = z_known
        return SampleOutput(to_uint8(self.codec.decode(x)), x)

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """transformer/ (diffusers model), codec/, scheduler/ and the text encoder's location
        (it is frozen and shipped as a package, so it is referenced, not copied)."""
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        self.codec.save_pretrained(path / "codec")
        self.scheduler.save_pretrained(path / "scheduler")
        encoder = str(self.text_encoder.path) if self.text_encoder is not None else None
        (path / "pipeline.json").write_text(json.dumps({"text_encoder": encoder}, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MiniStackPipeline:
        path = _saved(path)
        meta = json.loads((path / "pipeline.json").read_text())
        scheduler_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler = make_scheduler("flow" if "FlowMatch" in scheduler_cfg["_class_name"] else "ddpm")
        return cls(
            transformer=DiT.from_pretrained(path / "transformer"),
            scheduler=scheduler.from_config(scheduler_cfg),
            codec=VideoCodec.from_pretrained(path / "codec"),
            text_encoder=TextEncoder(meta["text_encoder"]) if meta["text_encoder"] else None,
        )
