"""Noise schedules and the training objective, for the two parameterisations on offer.

- "flow" (default): rectified flow / flow matching (Lipman et al. 2023; Liu et al. 2023; SD3,
  Open-Sora): x_t = (1 - s) x_0 + s eps with s = sigma in [0, 1]; the model predicts the
  velocity eps - x_0. Sampled with diffusers' FlowMatchEulerDiscreteScheduler. Training sigmas
  are logit-normal (SD3) by default, which weights the middle of the path where the task is
  hardest, or uniform (SiT, Lipman et al.); either can be shifted towards noise (SD3's time
  shift s' = k s / (1 + (k - 1) s)): a model that decides what to draw at high noise (which
  digit, where) spends more of its training there.
- "ddpm": the DiT paper's eps-prediction on a linear beta schedule (1000 steps), sampled with
  DDIM. With `learn_sigma` the DiT also outputs a variance; we train only the eps half (the
  paper adds a variational-bound term for it, which DDIM sampling does not use).

A DiT with `target="data"` predicts the clean latent x_0 instead (Li & He 2025, "Back to Basics:
Let Denoising Generative Models Denoise"): with large pixel patches each token's output is a
high-dimensional block of an image, and clean images lie on a low-dimensional manifold that a
small network fits far sooner than noise or velocity, which do not. It is still trained and
sampled as flow: its velocity is (x_t - x_0_hat) / sigma, sigma clipped below at MIN_SIGMA.

The DiT is conditioned on `timestep`: sigma * 1000 for flow (what the flow scheduler's
`timesteps` hold), the integer step for ddpm, so training and sampling agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

KINDS = ("flow", "ddpm")
SIGMA_SAMPLINGS = ("logit_normal", "uniform")
TRAIN_STEPS = 1000
MIN_SIGMA = 0.05  # a data-predicting DiT's velocity divides by sigma: clipped here, as Li & He do


def make_scheduler(kind: str = "flow"):
    """The sampling scheduler for a parameterisation."""
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_STEPS, shift=1.0)
    if kind == "ddpm":
        return DDIMScheduler(
            num_train_timesteps=TRAIN_STEPS, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False
        )
    raise ValueError(f"unknown diffusion kind {kind!r} (expected one of {KINDS})")


def kind_of(scheduler) -> str:
    """'flow' or 'ddpm' for a scheduler made by make_scheduler (or loaded from its config)."""
    return "flow" if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else "ddpm"


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """x_t for a batch of `timestep`s as the scheduler defines them (used for SDEdit and for
    re-noising the known frames of image-to-video and extension)."""
    if kind_of(scheduler) == "flow":
        sigma = (timestep.float() / TRAIN_STEPS).view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise
    return scheduler.add_noise(x0, noise, timestep.long())


def prediction(model_out: torch.Tensor, channels: int) -> torch.Tensor:
    """The velocity / eps part of the DiT output (drops the learned-sigma half if present)."""
    return model_out[:, :channels]


def target_of(model: torch.nn.Module) -> str:
    """The DiT's `target` ("native" or "data") through any wrapper (DDP, DeepSpeed, torch.compile)."""
    while hasattr(model, "_orig_mod") or (not hasattr(model, "cfg") and hasattr(model, "module")):
        model = getattr(model, "_orig_mod", None) or model.module
    return getattr(getattr(model, "cfg", None), "target", "native")


def native_output(model_out: torch.Tensor, xt: torch.Tensor, timestep: torch.Tensor, target: str) -> torch.Tensor:
    """The scheduler's quantity (velocity for flow) from a DiT's output of `target`."""
    if target == "native":
        return model_out
    sigma = (timestep.float() / TRAIN_STEPS).clamp(min=MIN_SIGMA).view(-1, *[1] * (xt.dim() - 1)).to(xt.dtype)
    return (xt - model_out) / sigma


def flow_sigmas(
    n: int, generator: torch.Generator | None = None, sampling: str = "logit_normal", shift: float = 1.0, device=None
) -> torch.Tensor:
    """n training sigmas in (0, 1): logit-normal (sigmoid of a standard normal) or uniform, then
    time-shifted by `shift` (1: unchanged; > 1: towards noise)."""
    if sampling == "logit_normal":
        sigma = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    elif sampling == "uniform":
        sigma = torch.rand(n, generator=generator, device=device)
    else:
        raise ValueError(f"unknown sigma sampling {sampling!r} (expected one of {SIGMA_SAMPLINGS})")
    return shift * sigma / (1 + (shift - 1) * sigma)


def per_sample_noise(
    shape: tuple[int, ...], kind: str, seeds: list[int], device=None, sampling: str = "logit_normal", shift: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestep [B], noise [B, ...]) drawn per sample from its own seed (flow sigmas as
    `flow_sigmas` draws them). A sample's noise then depends on nothing but its seed: not on how
    the batch is split across data-parallel ranks, nor on the RNG state a resumed run starts from."""
    timesteps, noises = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        if kind == "flow":
            timesteps.append(flow_sigmas(1, g, sampling, shift) * TRAIN_STEPS)
        else:
            timesteps.append(torch.randint(0, TRAIN_STEPS, (1,), generator=g))
        noises.append(torch.randn(shape[1:], generator=g))
    return torch.cat(timesteps).to(device), torch.stack(noises).to(device)


def training_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    kind: str = "flow",
    generator: torch.Generator | None = None,
    timestep: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    per_sample: bool = False,
    **model_kwargs,
) -> torch.Tensor:
    """Mean-squared error of the model's prediction on x0 noised at random (or given) timesteps:
    a scalar, or with `per_sample` one mean per sample, shape [B].

    Pass `timestep` and `noise` to evaluate at fixed points (the validation loss that scaling
    fits use must not move with the sampling of t).
    """
    b = x0.shape[0]
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if kind == "flow":
        if timestep is None:
            timestep = flow_sigmas(b, generator, device=x0.device) * TRAIN_STEPS
        sigma = (timestep.float() / TRAIN_STEPS).view(b, 1, 1, 1, 1).to(x0.dtype)
        xt, target = (1 - sigma) * x0 + sigma * noise, noise - x0
    elif kind == "ddpm":
        if timestep is None:
            timestep = torch.randint(0, TRAIN_STEPS, (b,), generator=generator, device=x0.device)
        sched = DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule="linear")
        xt, target = sched.add_noise(x0, noise, timestep.long()), noise
    else:
        raise ValueError(f"unknown diffusion kind {kind!r} (expected one of {KINDS})")
    output = target_of(model)
    if output == "data" and kind != "flow":
        raise ValueError("a DiT with target='data' trains with diffusion 'flow' only")
    out = native_output(prediction(model(xt, timestep, **model_kwargs), x0.shape[1]), xt, timestep, output)
    if per_sample:
        return (out.float() - target.float()).square().flatten(1).mean(1)
    return F.mse_loss(out.float(), target.float())
