"""The VAE stage: train the video compression network on the run's clips, then freeze it for the DiT.

    ministack train vae configs/train/tiny-vae.yaml      -> RUN_DIR/codec   (then `codec: RUN_DIR/codec`)

Loss: L1 reconstruction of a sample from the posterior, plus a small KL to the unit Gaussian
(keeps the latent smooth and bounded, as in Stable Diffusion's and Wan's VAEs; the perceptual
and adversarial terms of the big recipes are left out at this size). The run starts from
`vae.init` ("tiny": the seeded 621K-parameter causal Wan; or a codec directory to fine-tune),
goes through accelerate (single process, DDP), checkpoints atomically and resumes like the DiT
stage. At the end the latents' per-channel mean/std are fitted on training clips (so the DiT sees
~unit-variance latents), the codec is saved, and its reconstruction PSNR on held-out clips is
reported and written to RUN_DIR/codec/eval.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from model.vae import load_codec
from train import checkpoint
from train.runlog import start_attempt
from train.config import TrainConfig, validate
from train.faults import RunLock, die_with_parent
from train.quiet import quiet_deepspeed_on_cpu
from train.data.loader import make_loader
from train.schedule import lr_lambda


class ReconstructionLoss(nn.Module):
    """The codec and its training loss in one module, so DDP wraps (and syncs) one forward."""

    def __init__(self, codec, kl_weight: float) -> None:
        super().__init__()
        self.codec, self.kl_weight = codec, kl_weight

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, L1 reconstruction) of one batch, decoding a posterior sample."""
        posterior, _ = self.codec.posterior(video)
        recon = self.codec.vae.decode(posterior.sample()).sample[:, :, : video.shape[2]]
        l1 = (recon - video).abs().mean()
        return l1 + self.kl_weight * posterior.kl().mean(), l1


@torch.no_grad()
def psnr(codec, clips: list) -> float:
    """Mean reconstruction PSNR (dB, pixel range [-1, 1] taken as 2) of clips through the codec."""
    values = []
    for clip in clips:
        video = clip.video[None].to(codec.shift.device)
        mse = (codec.decode(codec.encode(video)) - video).pow(2).mean().item()
        values.append(10 * math.log10(4 / max(mse, 1e-12)))
    return sum(values) / len(values)


def train_vae(cfg: TrainConfig) -> dict:
    """Train the codec of `cfg.vae` in RUN_DIR/vae, holding the run directory's lock (train.faults)."""
    validate(cfg)  # before anything loads: impossible settings
    cfg.check_buckets("vae")  # and buckets the codec cannot take
    die_with_parent()
    quiet_deepspeed_on_cpu()  # before deepspeed's first import: its "no GPU found" warning on a CPU run (train.quiet)
    main = int(os.environ.get("RANK", "0")) == 0  # accelerate's global rank, known before the Accelerator
    with RunLock(Path(cfg.run_dir)) if main else contextlib.nullcontext():
        return _train_vae(cfg)


def _train_vae(cfg: TrainConfig) -> dict:
    vcfg = cfg.vae
    accelerator = Accelerator()
    set_seed(cfg.seed, device_specific=True)
    run = Path(cfg.run_dir) / "vae"
    out = Path(vcfg.out or Path(cfg.run_dir) / "codec")
    codec = load_codec(vcfg.init).to(accelerator.device)
    if codec.vae is None:
        raise ValueError("vae.init must be 'tiny' or a VAE codec directory: the identity codec has nothing to train")
    codec.vae.requires_grad_(True).train()
    model = ReconstructionLoss(codec, vcfg.kl_weight)
    optimizer = torch.optim.AdamW(codec.vae.parameters(), lr=vcfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(vcfg.warmup_steps, vcfg.steps))
    loader, sampler, _ = make_loader(cfg.data, accelerator.process_index, accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    states = {"sampler": sampler, "schedule": scheduler}  # saved as data by train.checkpoint, not pickled
    resume, meta = checkpoint.resume(accelerator, run / "checkpoints", states)
    step = meta.get("step", 0)
    if resume is not None:
        accelerator.print(f"resumed from {resume} at step {step}")
    if (
        accelerator.is_main_process
    ):  # the log holds each step once: a killed attempt's steps past the checkpoint go aside
        run.mkdir(parents=True, exist_ok=True)
        start_attempt(run, step, accelerator.num_processes)
    accelerator.wait_for_everyone()
    log = (run / "log.jsonl").open("a") if accelerator.is_main_process else None
    bar = tqdm(total=vcfg.steps, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    while step < vcfg.steps:
        for batch in loader:
            if not batch["captions"]:
                continue
            loss, l1 = model(batch["video"].to(accelerator.device))
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the LR this step used
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss, l1 = accelerator.reduce(torch.stack([loss.detach(), l1.detach()]), "mean").tolist()  # over ranks
            if log is not None:
                log.write(json.dumps({"step": step, "loss": loss, "l1": l1, "lr": lr}) + "\n")
                log.flush()
            bar.set_postfix(l1=f"{l1:.4f}")
            bar.update()
            if step % cfg.checkpoint_every == 0 or step == vcfg.steps:
                checkpoint.save(accelerator, run / "checkpoints", step, {"l1": l1}, cfg.keep_checkpoints, states, model)
            if step >= vcfg.steps:
                break
    bar.close()
    if log is not None:
        log.close()
    result = {"step": step, "codec": str(out)}
    if accelerator.is_main_process:
        result |= finish(accelerator.unwrap_model(model).codec, cfg, out)
        accelerator.print(
            f"vae: {step} steps; held-out PSNR {result['psnr']:.2f} dB; codec saved to {out} (use it with codec: {out})"
        )
    accelerator.wait_for_everyone()
    return result


@torch.no_grad()
def finish(codec, cfg: TrainConfig, out: Path) -> dict:
    """Freeze, fit the latent normalization on training clips, save, and score held-out clips."""
    from train.data.loader import make_dataset

    codec.vae.requires_grad_(False).eval()
    batches = [b for _, b in zip(range(8), make_loader(cfg.data)[0]) if b["captions"]]
    # latents of different buckets differ in shape: fit on the flattened per-channel values of all of them
    channels = torch.cat(
        [codec.encode(b["video"].to(codec.shift.device)).transpose(0, 1).flatten(1) for b in batches], 1
    )
    codec.fit_normalization(channels.T[:, :, None, None, None])
    codec.save_pretrained(out)
    held_out = make_dataset(replace(cfg.data, seed=cfg.data.seed + 1, size=16))
    clips = [c for c in (held_out[i] for i in range(len(held_out))) if c is not None]
    result = {"psnr": psnr(codec, clips), "clips": len(clips)}
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return result
