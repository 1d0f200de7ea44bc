"""The training loop: accelerate (single process, DDP, DeepSpeed ZeRO) under a FLOPs profiler.

Per optimizer step: clips -> frozen codec -> latents, captions (a seeded 10% replaced by "",
for classifier-free guidance) -> frozen text encoder -> tokens, or both read from the latent
cache (train.data.latents, built first when `latent_cache` is set); flow-matching (or DDPM)
loss on the DiT, clipped AdamW step on a warm-up + cosine LR, EMA update. Every step's FLOPs
are counted once per distinct shape (profiling.measure on fake tensors: the DiT's forward +
backward by part, the frozen encoders' forwards as "frozen" when they ran in the loop) and
appended to the run's ledger by every rank, with wall time and MFU. Checkpoints are atomic and
resume exactly (model, optimizer, schedule, EMA, RNG states, data position).

A run is its phases in order: `setup` (encoders, accelerator, model, data), `resume` (the newest
checkpoint, the attempt), `open_channels` (ledger, log, TensorBoard, bar, stop request), then per
micro-batch `step` and per optimizer step `close_step`, `checkpoint_if_due`, `evaluate_if_due`;
`finish` last. What they share is a `Run` (set up once) and its `Progress` (what moves).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from model.configs import load_config
from model.diffusion import per_sample_noise, training_loss
from model.dit import DiT, DiTConfig
from model.text_encoder import TextEncoder
from model.vae import VideoCodec, load_codec
from profiling.hardware import DevicePeak, device_peak, format_rate
from profiling.ledger import Ledger, Record, make_record, read_ledgers
from profiling.parts import param_parts
from profiling.report import Group, format_report, summarize
from profiling.threads import ThreadWatch, apply_thread_policy
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


@dataclass
class Run:
    """What a run sets up once and every phase reads."""

    cfg: TrainConfig
    dir: Path
    accelerator: Accelerator
    threads: ThreadWatch  # the CPU's intra-op team, resized to the load between steps
    model_cfg: DiTConfig  # the DiT as trained: the codec's channels, the text encoder's width
    model: torch.nn.Module  # as accelerate prepared it (and compiled, with compile: true)
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    codec: VideoCodec
    text_encoder: TextEncoder | None
    loader: DataLoader
    null: tuple[torch.Tensor, torch.Tensor] | None  # the cached empty caption that caption dropout swaps in
    meter: StepMeter
    params: dict[str, int]  # by part, for the ledger's law
    param_dtype: torch.dtype  # DeepSpeed bf16 converts the model but not its inputs
    states: dict  # saved with each checkpoint as data, not pickled (train.checkpoint)
    deepspeed: DeepSpeedPlugin | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Progress:
    """What moves as the run trains: the step, the open accumulation window and its clock."""

    step: int
    attempt: int  # this start of the run (train.runlog)
    dtype: str  # the peak's: "bf16" or "fp32"
    peak: DevicePeak
    guard: NonfiniteGuard
    window: StepWindow = field(default_factory=StepWindow)
    step_start: float = 0.0  # perf_counter when the window's step began, counting excluded
    lr: float | None = None  # the LR the last update used; None: the guard skipped it
    dropped: int = 0  # clips that failed to decode during training
    losses: list[float] = field(default_factory=list)
    preempted: bool = False


@dataclass
class Channels:
    """What the run talks through as it trains: the ledger (every rank); the log, TensorBoard and
    the progress bar (main process only, else None and a disabled bar); the stop request in."""

    ledger: Ledger
    so_far: Group  # this rank's train records so far, earlier attempts' included: the bar's MFU and tokens/s
    log: TextIO | None
    board: SummaryWriter | None
    bar: tqdm
    stop: StopRequest


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
    run = setup(cfg)
    state = resume(run)
    channels = open_channels(run, state.step)
    state.step_start = time.perf_counter()
    while state.step < cfg.max_steps and not state.preempted:
        for batch in run.loader:
            if not step(run, state, batch):  # mid-window, an empty batch or a skipped update: no step to close
                continue
            stop = close_step(run, state, channels)
            checkpoint_if_due(run, state, stop)
            if stop and state.step < cfg.max_steps:  # the job is about to lose the machine: resume later
                state.preempted = True
                break
            evaluate_if_due(run, state, channels)
            if state.step >= cfg.max_steps:
                break
    return finish(run, state, channels)


def setup(cfg: TrainConfig) -> Run:
    """The run's thread team, frozen encoders, accelerator, DiT with its EMA, optimizer and LR
    schedule, and data, in the order the RNG and ZeRO-3 need them."""
    threads = ThreadWatch(
        None if torch.cuda.is_available() else apply_thread_policy()
    )  # CPU: a team sized to the free cores (profiling.threads)
    # Frozen encoders load before the Accelerator exists: under ZeRO-3 accelerate makes transformers
    # partition every model it loads afterwards, and these must stay whole on every rank.
    model_cfg = load_config(cfg.model)
    codec = load_codec(cfg.codec)
    text_encoder = TextEncoder(cfg.text_encoder) if model_cfg.text_dim else None
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed, device_specific=True)
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
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
    optimizer = adamw(
        model.parameters(), cfg.lr, cfg.weight_decay, deepspeed=deepspeed is not None
    )  # fused (train.speed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    loader, sampler, null = load_data(cfg, accelerator, codec, text_encoder)
    if deepspeed is not None:  # no dataloader goes through prepare(): tell DeepSpeed the batch and clipping
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        deepspeed.deepspeed_config["gradient_clipping"] = cfg.grad_clip
    # The LR schedule is stepped by us once per optimizer step: accelerate's wrapper would step it
    # once per process (it assumes each rank sees 1/N of the steps), running the schedule N x fast.
    model, optimizer = accelerator.prepare(model, optimizer)
    param_dtype = next(model.parameters()).dtype
    states = {"ema": ema, "sampler": sampler, "schedule": scheduler}
    if cfg.compile:
        model = torch.compile(model)
    meter = StepMeter(model_cfg, codec, text_encoder, device)
    return Run(
        cfg,
        run_dir,
        accelerator,
        threads,
        model_cfg,
        model,
        ema,
        optimizer,
        scheduler,
        codec,
        text_encoder,
        loader,
        null,
        meter,
        params,
        param_dtype,
        states,
        deepspeed,
    )


def load_data(cfg: TrainConfig, accelerator: Accelerator, codec, text_encoder):
    """(loader, sampler, null) of this rank: batches of clips, or of cached latents when
    `latent_cache` is set (the cache built, or resumed, first by the main process); null is the
    cached empty caption's embedding (None without a cache or text)."""
    if cfg.latent_cache:
        with accelerator.main_process_first():  # the main process builds (or resumes) it, the others read it
            manifest = build_cache(cfg, cfg.latent_cache, codec, text_encoder, log=accelerator.print)
        accelerator.print(
            f"data: latent cache {cfg.latent_cache}: {manifest['clips']} clips "
            f"({manifest['skipped']} skipped), encoders' {manifest['frozen_flops']:.3e} FLOPs spent once there"
        )
    loader, sampler, dataset = make_loader(
        cfg.data, accelerator.process_index, accelerator.num_processes, cfg.latent_cache
    )
    null = None
    if cfg.latent_cache and manifest["text"]:
        null = tuple(t.to(accelerator.device) for t in dataset.null_context())
    if hasattr(dataset, "report"):  # real data: what was usable, what was skipped and why
        accelerator.print(f"data: {dataset.report()}")
    return loader, sampler, null


def resume(run: Run) -> Progress:
    """Where this start of the run begins: its newest intact checkpoint restored into the run's
    objects (step 0 without one), the attempt recorded, the peak its MFU is measured against."""
    accelerator = run.accelerator
    resumed, meta = checkpoint.resume(accelerator, run.dir / "checkpoints", run.states)
    step = meta.get("step", 0)
    if resumed is not None:
        accelerator.print(f"resumed from {resumed} at step {step}")
    # Steps past the checkpoint that an earlier attempt logged are about to be redone: move them aside
    # before anyone writes, so every file holds each optimizer step once (train.runlog).
    attempt = [start_attempt(run.dir, step, accelerator.num_processes) if accelerator.is_main_process else 0]
    broadcast_object_list(attempt)
    dtype = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
    peak = device_peak(run.device, dtype)
    accelerator.print(f"peak: {peak.device} {peak.dtype} {format_rate(peak.flops)} ({peak.source})")
    guard = NonfiniteGuard(nonfinite_policy(run.cfg, accelerator), run.cfg.max_nonfinite_steps, log=accelerator.print)
    return Progress(step, attempt[0], dtype, peak, guard)


def open_channels(run: Run, step: int) -> Channels:
    """The ledger, and on the main process the log, TensorBoard and the bar, opened at `step`; the
    stop request (SIGUSR1 or the stop file) watched from here on."""
    main = run.accelerator.is_main_process
    ledger = Ledger(run.dir / "ledger.jsonl")
    # The bar's MFU and tokens/s are the run's so far, as the closing report computes them (profiling.report.Group:
    # counted FLOPs / (wall time x peak), tokens / wall time), not the last step's: over this rank's records,
    # those of earlier attempts included.
    so_far = Group("train")
    if main and ledger.path.is_file():
        for r in read_ledgers([ledger.path]).records:
            if r.kind == "train" and r.rank == run.accelerator.process_index:
                so_far.add(r)
    log = (run.dir / "log.jsonl").open("a") if main else None
    # purge_step: TensorBoard drops the events a killed attempt wrote past the checkpoint
    board = SummaryWriter(str(run.dir / "tensorboard"), purge_step=step + 1) if main else None
    bar = tqdm(total=run.cfg.max_steps, initial=step, disable=not main, dynamic_ncols=True)
    return Channels(ledger, so_far, log, board, bar, StopRequest(run.dir, main))


def step(run: Run, state: Progress, batch: dict) -> bool:
    """One micro-batch forward and backward; at the end of an accumulation window, the update.
    True when an optimizer step was taken (the window ended and its update was finite)."""
    accelerator = run.accelerator
    state.dropped += batch["dropped"]
    if any_rank_empty(accelerator, batch):  # every clip of a batch failed to decode: all ranks skip it
        return False
    with accelerator.accumulate(run.model):
        micro_batch(run, state, batch)
        if accelerator.sync_gradients:
            state.lr = apply_update(
                accelerator,
                run.model,
                run.optimizer,
                run.scheduler,
                run.cfg.grad_clip,
                state.guard,
                state.window,
                state.step + 1,
            )
    if not accelerator.sync_gradients:
        return False
    if state.lr is None:  # a non-finite step, skipped: no update, no EMA, not counted
        state.window, state.step_start = StepWindow(), time.perf_counter()
        return False
    return True


def micro_batch(run: Run, state: Progress, batch: dict) -> None:
    """Encode the batch (or read its cached latents), count its FLOPs into the window, and run the
    loss's forward and backward on noise seeded per sample (the same after a resume)."""
    cfg = run.cfg
    seeds = [zlib.crc32(f"{cfg.seed}|{state.step}|{source}".encode()) for source in batch["sources"]]
    video, latents, context, mask = encode_batch(
        batch, run.codec, run.text_encoder, run.null, dropped_captions(seeds, cfg.cond_drop), run.device
    )
    counting = time.perf_counter()  # counting is bookkeeping, not the step: keep it off the clock
    # (counted in the encoders' dtype, the fp32 twin's: FLOPs do not depend on it)
    state.window.add(
        run.meter.count(video, latents, batch["captions"], context, mask),
        latents.shape[0] * run.model_cfg.num_tokens(*latents.shape[2:]),
        tuple(latents.shape),
    )
    state.step_start += time.perf_counter() - counting
    latents = latents.to(run.param_dtype)
    kwargs = {} if context is None else {"context": context.to(run.param_dtype), "context_mask": mask}
    timestep, noise = per_sample_noise(
        latents.shape, cfg.diffusion, seeds, run.device, cfg.sigma_sampling, cfg.sigma_shift
    )
    with run.accelerator.autocast():
        loss = training_loss(
            run.model, latents, cfg.diffusion, timestep=timestep, noise=noise.to(latents.dtype), **kwargs
        )
    state.window.losses.append(loss.detach().float())
    state.window.sources += list(batch["sources"])
    state.window.seeds += seeds
    run.accelerator.backward(loss)


def close_step(run: Run, state: Progress, channels: Channels) -> bool:
    """After an optimizer step: the EMA, the global batch's loss, the ledger record, the log, a new
    window. Returns whether any rank was asked to stop (all learn it at the same step)."""
    accelerator = run.accelerator
    state.step += 1
    with gathered(run.model, run.deepspeed):
        run.ema.update(accelerator.unwrap_model(run.model))
    # The global batch's loss (the mean over every micro-batch of every rank) and its size. The
    # reduction also waits for the device, so the wall time below is the step's, not its launch's.
    totals = state.window.totals(run.device, channels.stop.requested())
    loss_sum, micro, samples, stops = accelerator.reduce(totals, "sum").tolist()
    state.losses.append(loss_sum / micro)
    wall = time.perf_counter() - state.step_start
    record = make_record(
        "train",
        state.window.flops,
        run.params,
        state.window.tokens,
        wall,
        state.peak,
        state.window.shape(run.cfg.grad_accum, round(samples)),
        run=str(run.dir),
        step=state.step,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        attempt=state.attempt,
    )
    channels.ledger.append(record)
    if channels.log is not None:
        log_step(run, state, channels, record, round(samples), wall)
    channels.bar.update()
    state.peak = (
        device_peak(run.device, state.dtype) if run.threads.step() else state.peak
    )  # threads resized to the load: the peak is per count
    state.window, state.step_start = StepWindow(), time.perf_counter()
    return bool(stops)


def log_step(run: Run, state: Progress, channels: Channels, record: Record, samples: int, wall: float) -> None:
    """The step on the main process: a line of log.jsonl, TensorBoard's scalars, the bar's postfix."""
    world = run.accelerator.num_processes
    entry = {
        "step": state.step,
        "loss": state.losses[-1],
        "lr": state.lr,
        "samples": samples,
        "step_s": wall,
        "tokens_per_s": state.window.tokens * world / wall,
        "mfu": record.mfu,
        "dropped": state.dropped,
        "attempt": state.attempt,
    }
    channels.log.write(json.dumps(entry) + "\n")
    channels.log.flush()
    for key in ("loss", "lr", "tokens_per_s", "mfu"):
        channels.board.add_scalar(f"train/{key}", entry[key], state.step)
    channels.so_far.add(record)
    channels.bar.set_postfix(
        {
            "loss": f"{state.losses[-1]:.4f}",
            "mfu(run)": f"{channels.so_far.mfu:.1%}",
            "tok_s(run)": f"{channels.so_far.tokens * world / channels.so_far.wall_s:.0f}",
        }
    )


def checkpoint_if_due(run: Run, state: Progress, stop: bool) -> None:
    """A checkpoint every checkpoint_every steps, at the last step, and when a stop is requested."""
    cfg = run.cfg
    if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps or stop:
        checkpoint.save(
            run.accelerator,
            run.dir / "checkpoints",
            state.step,
            {"loss": state.losses[-1]},
            cfg.keep_checkpoints,
            run.states,
            run.model,
        )
        state.step_start = time.perf_counter()


def evaluate_if_due(run: Run, state: Progress, channels: Channels) -> None:
    """The EMA pipeline evaluated every eval_every steps before the last (the last is `finish`'s)."""
    cfg = run.cfg
    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
        evaluate(run.accelerator, ema_pipeline(run), cfg, run.dir, state.step, channels.board)
        state.step_start = time.perf_counter()


def finish(run: Run, state: Progress, channels: Channels) -> dict:
    """Close the channels; a preempted run leaves its marker for the requeue, a finished one saves
    its EMA pipeline, evaluates it and reports its measured compute against 6ND."""
    accelerator = run.accelerator
    channels.bar.close()
    if channels.log is not None:
        channels.log.close()
    if state.dropped:
        accelerator.print(f"data: {state.dropped} clips failed to decode during training and were skipped")
    result = {"step": state.step, "losses": state.losses, "dropped": state.dropped, "run": str(run.dir)}
    if state.preempted:
        if accelerator.is_main_process:
            channels.stop.mark(state.step)
        accelerator.print(f"stop requested: checkpointed at step {state.step}; the job can be requeued")
        return result | {"preempted": True}
    pipeline = ema_pipeline(run)
    if pipeline is not None:
        pipeline.save_pretrained(run.dir / "pipeline")
    evaluate(accelerator, pipeline, run.cfg, run.dir, state.step, channels.board)
    if channels.board is not None:
        channels.board.close()
    if accelerator.is_main_process:  # the run's measured compute against 6ND, the gap by part
        data = read_ledgers([channels.ledger.path])
        accelerator.print(format_report(*summarize(data.records), data.skipped))
        if superseded := superseded_summary(run.dir):
            accelerator.print(superseded)
    accelerator.print(f"trained {state.step} steps; run in {run.dir}")
    return result


def ema_pipeline(run: Run):
    """The EMA weights as a sampling pipeline (main process only; None elsewhere)."""
    from model.diffusion import make_scheduler
    from model.pipeline import MiniStackPipeline

    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    sampler_model = DiT.from_dit_config(accelerator.unwrap_model(run.model).cfg).to(accelerator.device)
    run.ema.copy_to(sampler_model)
    return MiniStackPipeline(sampler_model.eval(), make_scheduler(run.cfg.diffusion), run.codec, run.text_encoder)


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
