"""The training loop: accelerate (single process, DDP, DeepSpeed ZeRO) under a FLOPs profiler.

Per optimizer step: clips -> frozen codec -> latents, captions (a seeded 10% replaced by "",
for classifier-free guidance) -> frozen text encoder -> tokens, or both read from the latent
cache (train.data.latents, built first when `latent_cache` is set); flow-matching (or DDPM)
loss on the DiT, clipped AdamW step on a warm-up + cosine LR, EMA update. Every step's FLOPs
are counted once per distinct shape (profiling.measure on fake tensors: the DiT's forward +
backward by part, the frozen encoders' forwards as "frozen" when they ran in the loop) and
appended to the run's ledger by every rank, with wall time and MFU. Checkpoints are atomic and
resume exactly (model, optimizer, schedule, EMA, RNG states, data position).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from model.configs import load_config
from model.diffusion import per_sample_noise, training_loss
from model.dit import DiT
from model.text_encoder import TextEncoder
from model.vae import load_codec
from profiling.threads import ThreadWatch, apply_thread_policy
from profiling.hardware import device_peak, format_rate
from profiling.ledger import Ledger, make_record, read_ledgers
from profiling.parts import param_parts
from profiling.report import Group, format_report, summarize
from train import checkpoint
from train.accelerator import gathered, make_accelerator
from train.config import TrainConfig, validate
from train.data.latents import build_cache
from train.data.loader import make_loader
from train.ema import EMA
from train.faults import NonfiniteGuard, RunLock, die_with_parent
from train.meter import StepMeter, StepWindow
from train.preempt import StopRequest
from train.quiet import quiet_deepspeed_on_cpu
from train.runlog import start_attempt, superseded_summary
from train.schedule import lr_lambda
from train.speed import adamw
from train.step import any_rank_empty, apply_update, dropped_captions, encode_batch, nonfinite_policy


def resume_attempt(accelerator, run: Path, states: dict) -> tuple[int, int]:
    """(step, attempt number) of this start of `run`: its newest intact checkpoint restored into the
    accelerator's objects and `states` (step 0 without one), and the attempt recorded."""
    resume, meta = checkpoint.resume(accelerator, run / "checkpoints", states)
    step = meta.get("step", 0)
    if resume is not None:
        accelerator.print(f"resumed from {resume} at step {step}")
    # Steps past the checkpoint that an earlier attempt logged are about to be redone: move them aside
    # before anyone writes, so every file holds each optimizer step once (train.runlog).
    attempt = [start_attempt(run, step, accelerator.num_processes) if accelerator.is_main_process else 0]
    broadcast_object_list(attempt)
    attempt = attempt[0]
    return step, attempt


def train(cfg: TrainConfig) -> dict:
    """Train the DiT of `cfg` in RUN_DIR (resuming from its newest intact checkpoint), holding the
    run directory's lock throughout. RunError (a second trainer on the directory, no intact
    checkpoint, a failed checkpoint write, a diverged run) is a failure with a message for the user."""
    validate(cfg)  # an impossible setting fails here, before anything loads
    cfg.check_buckets()  # a bucket the codec x patch cannot take fails here, before anything loads
    die_with_parent()  # under a launcher: this rank goes when the launcher goes
    quiet_deepspeed_on_cpu()  # before deepspeed's first import: its "no GPU found" warning on a CPU run (train.quiet)
    main = int(os.environ.get("RANK", "0")) == 0  # accelerate's global rank, known before the Accelerator
    with RunLock(Path(cfg.run_dir)) if main else contextlib.nullcontext():
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict:
    threads = ThreadWatch(None if torch.cuda.is_available() else apply_thread_policy())  # CPU: a team sized to the free cores (profiling.threads)
    # Frozen encoders load before the Accelerator exists: under ZeRO-3 accelerate makes transformers
    # partition every model it loads afterwards, and these must stay whole on every rank.
    model_cfg = load_config(cfg.model)
    codec = load_codec(cfg.codec)
    text_encoder = TextEncoder(cfg.text_encoder) if model_cfg.text_dim else None
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed, device_specific=True)
    run = Path(cfg.run_dir)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    device = accelerator.device

    deepspeed = accelerator.state.deepspeed_plugin
    codec = codec.to(device)
    text_encoder = text_encoder.to(device) if text_encoder is not None else None
    model_cfg = replace(model_cfg, in_channels=codec.latent_channels, text_dim=text_encoder.dim if text_encoder else 0)
    model = DiT.from_dit_config(model_cfg).to(device)  # before the EMA copies it: the shadow lives on the device
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = param_parts(model, model.flop_parts)
    ema = EMA(model, cfg.ema_decay)
    optimizer = adamw(model.parameters(), cfg.lr, cfg.weight_decay, deepspeed=deepspeed is not None)  # fused (train.speed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    null = None  # the empty caption's embedding, which caption dropout swaps in on the cached path
    if cfg.latent_cache:
        with accelerator.main_process_first():  # the main process builds (or resumes) it, the others read it
            manifest = build_cache(cfg, cfg.latent_cache, codec, text_encoder, log=accelerator.print)
        accelerator.print(f"data: latent cache {cfg.latent_cache}: {manifest['clips']} clips "
                          f"({manifest['skipped']} skipped), encoders' {manifest['frozen_flops']:.3e} FLOPs spent once there")
    loader, sampler, dataset = make_loader(cfg.data, accelerator.process_index, accelerator.num_processes, cfg.latent_cache)
    if cfg.latent_cache and manifest["text"]:
        null = tuple(t.to(device) for t in dataset.null_context())
    if hasattr(dataset, "report"):  # real data: what was usable, what was skipped and why
        accelerator.print(f"data: {dataset.report()}")
    if deepspeed is not None:  # no dataloader goes through prepare(): tell DeepSpeed the batch and clipping
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = cfg.grad_clip
    # The LR schedule is stepped by us once per optimizer step: accelerate's wrapper would step it
    # once per process (it assumes each rank sees 1/N of the steps), running the schedule N x fast.
    model, optimizer = accelerator.prepare(model, optimizer)
    param_dtype = next(model.parameters()).dtype  # DeepSpeed bf16 converts the model but not its inputs
    states = {"ema": ema, "sampler": sampler, "schedule": scheduler}  # saved as data by train.checkpoint, not pickled
    if cfg.compile:
        model = torch.compile(model)
    meter = StepMeter(model_cfg, codec, text_encoder, device)

    step, attempt = resume_attempt(accelerator, run, states)

    dtype = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
    peak = device_peak(device, dtype)
    accelerator.print(f"peak: {peak.device} {peak.dtype} {format_rate(peak.flops)} ({peak.source})")
    ledger = Ledger(run / "ledger.jsonl")
    # The bar's MFU and tokens/s are the run's so far, as the closing report computes them (profiling.report.Group:
    # counted FLOPs / (wall time x peak), tokens / wall time), not the last step's: over this rank's records,
    # those of earlier attempts included.
    so_far = Group("train")
    if accelerator.is_main_process and ledger.path.is_file():
        for r in read_ledgers([ledger.path]).records:
            if r.kind == "train" and r.rank == accelerator.process_index:
                so_far.add(r)
    log = (run / "log.jsonl").open("a") if accelerator.is_main_process else None
    # purge_step: TensorBoard drops the events a killed attempt wrote past the checkpoint
    board = SummaryWriter(str(run / "tensorboard"), purge_step=step + 1) if accelerator.is_main_process else None
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    stop, preempted = StopRequest(run, accelerator.is_main_process), False
    window = StepWindow()
    guard = NonfiniteGuard(nonfinite_policy(cfg, accelerator), cfg.max_nonfinite_steps, log=accelerator.print)
    step_start, dropped = time.perf_counter(), 0
    losses: list[float] = []
    while step < cfg.max_steps and not preempted:
        for batch in loader:
            dropped += batch["dropped"]
            if any_rank_empty(accelerator, batch):  # every clip of a batch failed to decode: all ranks skip it
                continue
            with accelerator.accumulate(model):
                seeds = [zlib.crc32(f"{cfg.seed}|{step}|{source}".encode()) for source in batch["sources"]]
                video, latents, context, mask = encode_batch(batch, codec, text_encoder, null, dropped_captions(seeds, cfg.cond_drop), device)
                counting = time.perf_counter()  # counting is bookkeeping, not the step: keep it off the clock
                # (counted in the encoders' dtype, the fp32 twin's: FLOPs do not depend on it)
                window.add(meter.count(video, latents, batch["captions"], context, mask),
                           latents.shape[0] * model_cfg.num_tokens(*latents.shape[2:]), tuple(latents.shape))
                step_start += time.perf_counter() - counting
                latents = latents.to(param_dtype)
                kwargs = {} if context is None else {"context": context.to(param_dtype), "context_mask": mask}
                timestep, noise = per_sample_noise(latents.shape, cfg.diffusion, seeds, device, cfg.sigma_sampling, cfg.sigma_shift)
                with accelerator.autocast():
                    loss = training_loss(model, latents, cfg.diffusion, timestep=timestep, noise=noise.to(latents.dtype), **kwargs)
                window.losses.append(loss.detach().float())
                window.sources += list(batch["sources"])
                window.seeds += seeds
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    lr = apply_update(accelerator, model, optimizer, scheduler, cfg.grad_clip, guard, window, step + 1)
            if not accelerator.sync_gradients:
                continue
            if lr is None:  # a non-finite step, skipped: no update, no EMA, not counted
                window, step_start = StepWindow(), time.perf_counter()
                continue
            step += 1
            with gathered(model, deepspeed):
                ema.update(accelerator.unwrap_model(model))
            # The global batch's loss (the mean over every micro-batch of every rank) and its size. The
            # reduction also waits for the device, so the wall time below is the step's, not its launch's.
            loss_sum, micro, samples, stops = accelerator.reduce(window.totals(device, stop.requested()), "sum").tolist()
            losses.append(loss_sum / micro)
            wall = time.perf_counter() - step_start
            record = make_record("train", window.flops, params, window.tokens, wall, peak,
                                 window.shape(cfg.grad_accum, round(samples)), run=str(run), step=step,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes, attempt=attempt)
            ledger.append(record)
            if log is not None:
                entry = {"step": step, "loss": losses[-1], "lr": lr, "samples": round(samples), "step_s": wall,
                         "tokens_per_s": window.tokens * accelerator.num_processes / wall, "mfu": record.mfu,
                         "dropped": dropped, "attempt": attempt}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                for key in ("loss", "lr", "tokens_per_s", "mfu"):
                    board.add_scalar(f"train/{key}", entry[key], step)
                so_far.add(record)
                bar.set_postfix({"loss": f"{losses[-1]:.4f}", "mfu(run)": f"{so_far.mfu:.1%}",
                                 "tok_s(run)": f"{so_far.tokens * accelerator.num_processes / so_far.wall_s:.0f}"})
            bar.update()
            peak = device_peak(device, dtype) if threads.step() else peak  # threads resized to the load: the peak is per count
            window, step_start = StepWindow(), time.perf_counter()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stops:
                checkpoint.save(accelerator, run / "checkpoints", step, {"loss": losses[-1]}, cfg.keep_checkpoints,
                                states, model)
                step_start = time.perf_counter()
            if stops and step < cfg.max_steps:  # the job is about to lose the machine: resume later
                preempted = True
                break
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                evaluate(accelerator, ema_pipeline(accelerator, model, ema, codec, text_encoder, cfg), cfg, run, step, board)
                step_start = time.perf_counter()
            if step >= cfg.max_steps:
                break
    bar.close()
    if log is not None:
        log.close()
    if dropped:
        accelerator.print(f"data: {dropped} clips failed to decode during training and were skipped")
    if preempted:
        if accelerator.is_main_process:
            stop.mark(step)
        accelerator.print(f"stop requested: checkpointed at step {step}; the job can be requeued")
        return {"step": step, "losses": losses, "dropped": dropped, "run": str(run), "preempted": True}
    pipeline = ema_pipeline(accelerator, model, ema, codec, text_encoder, cfg)
    if pipeline is not None:
        pipeline.save_pretrained(run / "pipeline")
    evaluate(accelerator, pipeline, cfg, run, step, board)
    if board is not None:
        board.close()
    if accelerator.is_main_process:  # the run's measured compute against 6ND, the gap by part
        data = read_ledgers([ledger.path])
        accelerator.print(format_report(*summarize(data.records), data.skipped))
        if superseded := superseded_summary(run):
            accelerator.print(superseded)
    accelerator.print(f"trained {step} steps; run in {run}")
    return {"step": step, "losses": losses, "dropped": dropped, "run": str(run)}


def ema_pipeline(accelerator, model, ema: EMA, codec, text_encoder, cfg: TrainConfig):
    """The EMA weights as a sampling pipeline (main process only; None elsewhere)."""
    from model.diffusion import make_scheduler
    from model.pipeline import MiniStackPipeline

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    sampler_model = DiT.from_dit_config(accelerator.unwrap_model(model).cfg).to(accelerator.device)
    ema.copy_to(sampler_model)
    return MiniStackPipeline(sampler_model.eval(), make_scheduler(cfg.diffusion), codec, text_encoder)


def evaluate(accelerator, pipeline, cfg: TrainConfig, run: Path, step: int, board: SummaryWriter | None = None) -> None:
    """Validation loss and text alignment of the EMA pipeline (train.evaluate) on the main process
    (the others hold None): printed, and to TensorBoard (the scores and the sample sheet); then
    one barrier for all."""
    from train.evaluate import evaluate_run, format_eval, to_board

    if pipeline is not None:
        result = evaluate_run(pipeline, cfg, step, run)
        accelerator.print(format_eval(result))
        if board is not None:
            to_board(board, result)
    accelerator.wait_for_everyone()
