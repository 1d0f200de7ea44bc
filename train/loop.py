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
import math
import os
import random
import time
import zlib
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs, broadcast_object_list, set_seed
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
from profiling.measure import FlopMeter, forward_backward
from profiling.parts import FROZEN, param_parts
from profiling.report import Group, format_report, summarize
from train import checkpoint
from train.config import TrainConfig, validate
from train.data.latents import build_cache
from train.data.loader import make_loader
from train.ema import EMA
from train.faults import NonfiniteGuard, RunLock, die_with_parent
from train.preempt import StopRequest
from train.quiet import quiet_deepspeed_on_cpu
from train.runlog import start_attempt, superseded_summary
from train.speed import adamw


def mixed_precision(setting: str, cuda: bool) -> str:
    """accelerate's mixed_precision for a config's setting: "auto" is bf16 where it pays (GPUs;
    CPUs whose bf16 matmul is safe and clearly faster than fp32, measured by profiling.cpu), else
    "no". An explicit "bf16" is honoured anywhere (prepare_cpu has made it safe)."""
    if setting not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {setting!r}")
    if setting != "auto":
        return setting
    if cuda:
        return "bf16"
    from profiling.cpu import preferred_cpu_dtype

    return "bf16" if preferred_cpu_dtype() == "bf16" else "no"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's precision (mixed_precision), gloo where there is no CUDA (DeepSpeed would
    otherwise ask for NCCL), and a short collective timeout so hangs fail fast. DeepSpeed comes
    from the accelerate config (`accelerate launch`) or from the run's own `deepspeed:` JSON
    (any launcher: torchrun reads no accelerate config); both at once is refused."""
    precision = mixed_precision(cfg.mixed_precision, torch.cuda.is_available())
    kwargs = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = {} if torch.cuda.is_available() else {"backend": "gloo"}
        kwargs.append(InitProcessGroupKwargs(timeout=timedelta(minutes=10), **backend))
    plugin = None
    if cfg.deepspeed:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise ValueError("deepspeed: the accelerate config already sets up DeepSpeed; give one of the two")
        plugin = DeepSpeedPlugin(hf_ds_config=str(Path(cfg.deepspeed).resolve()))
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=kwargs,
                       deepspeed_plugin=plugin)


def gathered(model, deepspeed):
    """ZeRO-3 keeps 1/N of each parameter per rank: gather them whole (for the EMA) where needed."""
    if deepspeed is None or deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed as ds

    return ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def lr_lambda(warmup_steps: int, max_steps: int):
    """Linear warm-up, then cosine to zero at max_steps: the LR multiplier at each step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class StepWindow:
    """One optimizer step's micro-batches on this rank (grad_accum of them): FLOPs, tokens, the
    latent shapes they had and their losses."""

    def __init__(self) -> None:
        self.flops, self.tokens, self.shapes, self.losses = None, 0, [], []
        self.sources, self.seeds = [], []  # the batch's identity, for a non-finite step's message

    def add(self, flops, tokens: int, latent_shape: tuple[int, ...]) -> None:
        self.flops = flops if self.flops is None else self.flops + flops
        self.tokens += tokens
        self.shapes.append(latent_shape)

    def totals(self, device, stop: bool = False) -> torch.Tensor:
        """[sum of micro-batch losses, micro-batches, samples, stop requested] on this rank, to be
        summed over ranks (a stop request rides along: every rank learns of it at the same step)."""
        return torch.stack([torch.stack(self.losses).sum(),
                            torch.tensor(float(len(self.losses)), device=device),
                            torch.tensor(float(sum(s[0] for s in self.shapes)), device=device),
                            torch.tensor(float(stop), device=device)])

    def shape(self, grad_accum: int, samples_per_step: int) -> str:
        """The ledger's shape label: micro-batch size, samples per optimizer step (all ranks) and
        latent size, e.g. 'B=2 x2 accum, 8 samples/step, latent=1x16x16'."""
        sizes = sorted({s[0] for s in self.shapes})
        latents = "+".join(sorted({"x".join(map(str, s[2:])) for s in self.shapes}))
        accum = f" x{grad_accum} accum" if grad_accum > 1 else ""
        return f"B={'/'.join(map(str, sizes))}{accum}, {samples_per_step} samples/step, latent={latents}"


class StepMeter:
    """FLOPs of one micro-step, counted once per (batch, latent, text) shape on fake tensors."""

    def __init__(self, model_cfg, codec, text_encoder, device: torch.device) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        # A shape-only twin on the training device: counting never touches the (wrapped, sharded) trained model.
        # ("cpu:0", which accelerate reports for CPU ranks, and "cpu" must not count as two devices)
        with FakeTensorMode(), torch.device("cpu" if device.type == "cpu" else device):
            self.model = DiT.from_dit_config(model_cfg)
        self.codec, self.text_encoder = codec, text_encoder
        self.dit = FlopMeter(DiT.flop_parts)
        self.frozen = FlopMeter()

    def count(self, video: torch.Tensor | None, latents: torch.Tensor, captions: list[str], context, mask):
        """The DiT's forward + backward, plus the frozen encoders' forwards when they ran on `video`
        (None: the batch came from the latent cache, whose stage counted them once)."""
        key = (None if video is None else tuple(video.shape), tuple(latents.shape), None if context is None else tuple(context.shape))
        kwargs = {} if context is None else {"context": context, "context_mask": mask}
        t = torch.zeros(latents.shape[0], device=latents.device)
        dit = self.dit.count(key, forward_backward(self.model, latents, t, **kwargs))
        if video is None:
            return dit

        def frozen() -> None:
            with torch.no_grad():
                self.codec.encode(video)
                if self.text_encoder is not None:
                    self.text_encoder(captions, pad_to_max_length=True)

        return dit + self.frozen.count(key, frozen).relabel(FROZEN)


def any_rank_empty(accelerator, batch: dict) -> bool:
    """Whether any rank's batch came out empty (all its clips failed to decode after the scan).
    All ranks must skip such a step together: a rank that skipped alone would leave the others
    waiting in the gradient all-reduce until the collective timeout."""
    empty = not batch["captions"]
    if accelerator.num_processes == 1:
        return empty
    flag = torch.tensor([float(empty)], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def dropped_captions(seeds: list[int], rate: float) -> list[bool]:
    """Which samples train unconditioned (caption ""), from each sample's own seed: the same
    samples whatever the batch split across ranks, and again after a resume."""
    return [rate > 0 and random.Random(seed).random() < rate for seed in seeds]


@torch.no_grad()
def encode_batch(batch: dict, codec, text_encoder, null, drop: list[bool], device):
    """(video or None, latents, context, mask) of a batch of clips (encoded here by the frozen
    codec and text encoder) or of cached latents (`null`: the cached empty caption's embedding)."""
    if "latents" in batch:
        latents, context, mask = batch["latents"].to(device), batch["context"], batch["context_mask"]
        if context is not None:
            context, mask = context.to(device), mask.to(device)
            if any(drop):
                rows = torch.tensor(drop, device=device)
                context = torch.where(rows[:, None, None], null[0], context)
                mask = torch.where(rows[:, None], null[1], mask)
        return None, latents, context, mask
    video = batch["video"].to(device)
    captions = ["" if d else c for c, d in zip(batch["captions"], drop)]
    context, mask = text_encoder(captions, pad_to_max_length=True) if text_encoder else (None, None)
    return video, codec.encode(video), context, mask


def nonfinite_policy(cfg: TrainConfig, accelerator) -> str:
    """The policy for non-finite steps this run can honour. Under DeepSpeed the engine applies the
    update inside backward, before the loop sees the gradient norm: a bad step cannot be skipped
    there, only stopped after (its weights are never checkpointed), so "skip" becomes "stop", said
    once at the start."""
    if cfg.nonfinite == "skip" and accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.print("nonfinite=skip: under DeepSpeed the engine updates the weights inside backward, before the "
                          "gradient norm is known, so a non-finite step stops the run instead (as nonfinite=stop)")
        return "stop"
    return cfg.nonfinite


def apply_update(accelerator, model, optimizer, scheduler, grad_clip: float, guard: NonfiniteGuard,
                 window: StepWindow, step: int) -> float | None:
    """The optimizer step that ends an accumulation window: clip, check the window's loss and the
    gradient norm are finite on every rank, then step the optimizer and the LR schedule. Returns the
    LR the step used, or None when the guard skipped it (no update at all); RunError when the guard
    stops the run."""
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)  # DeepSpeed: the engine's norm
    loss = torch.stack(window.losses).sum().float()
    finite = bool(torch.isfinite(loss)) and (norm is None or bool(torch.isfinite(torch.as_tensor(norm))))
    if accelerator.num_processes > 1:  # every rank takes the same decision
        finite = accelerator.reduce(torch.tensor([float(not finite)], device=accelerator.device), "sum").item() == 0
    detail = (f"loss {loss.item() / len(window.losses)} / gradient norm {None if norm is None else float(norm)} "
              f"(rank {accelerator.process_index}) on the batch of sources {window.sources} (noise seeds {window.seeds})")
    if guard.skip(step, finite, detail):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    lr = scheduler.get_last_lr()[0]  # the LR this step used; stepping the schedule moves it on
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


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
