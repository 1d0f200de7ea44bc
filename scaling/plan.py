"""Planning a sweep: each run's length from its size's *measured* FLOPs per step.

For every depth the plan builds the family's DiT as a shape-only twin, counts one optimizer
step's forward + backward FLOPs with profiling.measure (the counter training records in its
ledger, so the budget is met in the compute the ledger will report), and sets

    steps = round(budget / measured FLOPs per step)         |error| <= 0.5 / steps of the budget

beside the 6ND plan (steps that 6 · N_non-embedding · tokens would give) and the exact formula
(model.flops.formula). A run shorter than `hparams.min_steps` is refused: its compute could
not hit the budget within 1 %, and its schedule would be all warm-up. Generated data
(procedural clips, moving digits or Fashion-MNIST items) is sized to the longest run, so no run
sees a clip twice (epochs <= 1; the digits' scans and the items' images do repeat, each in new
motion: the record's scan_epochs).

Wall time is estimated from this device: a few real optimizer steps of each size (the run's
precision, AdamW) plus rendering one batch of clips, times the planned steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from model.dit import DiT, DiTConfig
from model.flops.formula import dit_flops
from profiling.parts import law_params, param_parts
from scaling.config import SweepConfig
from scaling.record import PlannedRun
from train.config import TrainConfig, build_config
from train.data.loader import GENERATED_KINDS

BUDGET_TOLERANCE = 0.02  # a run's planned (and so its measured) compute is within 2 % of its budget
START_S = 8.0  # per-run start-up and final evaluation of `python -m train` on the 2-core CPU (imports ~6 s)


@dataclass
class SizeProfile:
    """One depth of the family: its parameters and one optimizer step's compute (all processes)."""

    depth: int
    model: DiTConfig
    params: dict[str, int]  # by part (profiling.parts)
    flops_per_step: dict[str, int]  # measured forward + backward, by part
    exact_per_step: int  # model.flops.formula
    tokens_per_step: int
    s_per_step: float | None = None  # timed on this device (None until timed)

    @property
    def n(self) -> int:
        """The law's N: trained, non-embedding parameters."""
        return law_params(self.params)

    @property
    def measured_per_step(self) -> int:
        return sum(self.flops_per_step.values())


@dataclass
class Plan:
    sweep: SweepConfig
    sizes: dict[int, SizeProfile]
    runs: list[PlannedRun]
    data_clips: int  # procedural clips the runs draw from (the longest run's samples)
    latent: tuple[int, ...]  # (C, t, h, w) of one sample

    def estimate_s(self, run: PlannedRun) -> float | None:
        s = self.sizes[run.depth].s_per_step
        return None if s is None else run.steps * s + START_S

    def to_dict(self) -> dict:
        return {
            "sweep": self.sweep.to_dict(),
            "data_clips": self.data_clips,
            "latent": list(self.latent),
            "sizes": {d: asdict(p) | {"n": p.n} for d, p in self.sizes.items()},
            "runs": [r.to_json() for r in self.runs],
        }


def base_train_config(sweep: SweepConfig) -> TrainConfig:
    """The sweep's `train:` mapping as a TrainConfig, checked: one data bucket (a run's FLOPs per
    step must be one number for its length to be solved), batch divisible over processes."""
    cfg = build_config(TrainConfig, sweep.train)
    if len(cfg.data.buckets) != 1:
        raise ValueError(
            f"train.data.buckets: a sweep trains on one bucket (its FLOPs per step must be fixed), "
            f"got {len(cfg.data.buckets)}"
        )
    per_micro = sweep.processes * cfg.grad_accum
    if sweep.hparams.batch_size % per_micro:
        raise ValueError(
            f"hparams.batch_size {sweep.hparams.batch_size} is not a multiple of processes x grad_accum ({per_micro})"
        )
    return cfg


def _latent(base: TrainConfig, patch) -> tuple[int, ...]:
    from model.sizes import SizeRule
    from model.vae import codec_compression, load_codec
    from train.data.buckets import parse_bucket

    t, h, w = SizeRule(codec_compression(base.codec), tuple(patch)).latent(parse_bucket(base.data.buckets[0]))
    return (load_codec(base.codec).latent_channels, t, h, w)


def profile_size(depth: int, sweep: SweepConfig, latent: tuple[int, ...], micro: int, micro_steps: int) -> SizeProfile:
    """Parameters and per-step FLOPs of the family's DiT at `depth`, counted on a shape-only twin
    (train.meter.StepMeter, the training loop's own counter) for `micro` samples per micro-step,
    `micro_steps` micro-steps per optimizer step (processes x grad_accum)."""
    model_cfg = sweep.family.model(depth, latent[0])
    counted = _profile(json.dumps(asdict(model_cfg), sort_keys=True), depth, latent, micro, micro_steps)
    return replace(
        counted, params=dict(counted.params), flops_per_step=dict(counted.flops_per_step)
    )  # timing fills in the copy


@functools.lru_cache(maxsize=64)
def _profile(model_json: str, depth: int, latent: tuple[int, ...], micro: int, micro_steps: int) -> SizeProfile:
    """profile_size's count, kept per model and shape: counting one size takes seconds, and a dry
    run, a rerun's plan and the sweep itself plan the same sizes in one process."""
    from model.text_encoder import MAX_LENGTH
    from train.meter import StepMeter

    model_cfg = DiTConfig(**json.loads(model_json))
    meter = StepMeter(model_cfg, None, None, torch.device("cpu"))
    context = mask = None
    if model_cfg.text_dim:
        context, mask = (
            torch.zeros(micro, MAX_LENGTH, model_cfg.text_dim),
            torch.ones(micro, MAX_LENGTH, dtype=torch.bool),
        )
    count = meter.count(None, torch.zeros(micro, *latent), [], context, mask)
    exact = dit_flops(model_cfg, micro, *latent[1:], text_len=MAX_LENGTH if model_cfg.text_dim else 0, backward=True)
    return SizeProfile(
        depth=depth,
        model=model_cfg,
        params=param_parts(meter.model, DiT.flop_parts),
        flops_per_step={k: v * micro_steps for k, v in count.by_part.items() if v},
        exact_per_step=sum(exact.values()) * micro_steps,
        tokens_per_step=micro * micro_steps * model_cfg.num_tokens(*latent[1:]),
    )


def config_hash(train: dict) -> str:
    """8 hex digits of the run's training config, its directory left out, and for generated data
    (procedural, digits, fashion) its clip count (it follows the sweep's longest run: adding a budget must not void finished
    runs, each of which saw every clip at most once either way)."""
    body = {k: v for k, v in train.items() if k not in ("run_dir", "slurm")}  # where a run runs is not what it trains
    if body["data"]["kind"] in GENERATED_KINDS:
        body["data"] = {k: v for k, v in body["data"].items() if k != "size"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]


def _budget_name(flops: float) -> str:
    return f"{flops:.3g}".replace("e+", "e")


def plan_sweep(sweep: SweepConfig) -> Plan:
    """Every run of the sweep: size x budget, then the LR-check runs (hparams.lr_multipliers at
    the smallest budget). Raises ValueError naming the runs too short for their budget or whose
    whole steps cannot come within BUDGET_TOLERANCE of it."""
    base = base_train_config(sweep)
    hp, budgets = sweep.hparams, sweep.budget_list()
    latent = _latent(base, sweep.family.patch_size)
    micro_steps = sweep.processes * base.grad_accum
    micro = hp.batch_size // micro_steps
    depths = sorted({d for b in budgets for d in b.sizes})
    sizes = {d: profile_size(d, sweep, latent, micro, micro_steps) for d in depths}
    wanted = [(b.flops, d, 1.0) for b in budgets for d in b.sizes]
    wanted += [(budgets[0].flops, d, float(m)) for m in hp.lr_multipliers for d in budgets[0].sizes if m != 1]
    short, runs = [], []
    for budget, depth, multiplier in wanted:
        size = sizes[depth]
        steps = round(budget / size.measured_per_step)
        miss = steps * size.measured_per_step / budget - 1
        if steps < hp.min_steps or abs(miss) > BUDGET_TOLERANCE:
            reason = f"C={_budget_name(budget)} depth {depth}: {steps} steps, {miss:+.1%} of the budget"
            short += [reason] if reason not in short else []  # the LR-check runs repeat a size's reason
            continue
        warmup = max(
            1,
            min(
                math.ceil(hp.warmup_tokens_per_param * size.n / size.tokens_per_step),
                int(hp.max_warmup_fraction * steps),
            ),
        )
        lr = hp.lr_at(size.model.hidden_size) * multiplier
        run_id = f"C{_budget_name(budget)}-d{depth}" + (f"-lr{multiplier:g}" if multiplier != 1 else "")
        runs.append(
            PlannedRun(
                id=run_id,
                budget=budget,
                depth=depth,
                lr_multiplier=multiplier,
                steps=steps,
                law_steps=round(budget / (6 * size.n * size.tokens_per_step)),
                warmup_steps=warmup,
                lr=lr,
                flops=float(steps * size.measured_per_step),
                hash="",
                train={},
            )
        )
    if short:
        raise ValueError(
            f"runs shorter than hparams.min_steps={hp.min_steps} or off their budget by more than "
            f"{BUDGET_TOLERANCE:.0%} (raise their budget, drop the size, or "
            f"lower hparams.batch_size): " + "; ".join(short)
        )
    data_clips = max(r.steps for r in runs) * hp.batch_size
    for run in runs:
        run.train = _run_config(base, sweep, sizes[run.depth], run, data_clips)
        run.hash = config_hash(run.train)
        run.train["run_dir"] = run.dir
    return Plan(sweep, sizes, runs, data_clips, latent)


def _run_config(base: TrainConfig, sweep: SweepConfig, size: SizeProfile, run: PlannedRun, data_clips: int) -> dict:
    data = replace(base.data, batch_size=sweep.hparams.batch_size // (sweep.processes * base.grad_accum))
    if data.kind in GENERATED_KINDS:
        data = replace(data, size=max(data_clips, sweep.hparams.batch_size))
    cfg = replace(
        base,
        data=data,
        max_steps=run.steps,
        warmup_steps=run.warmup_steps,
        lr=run.lr,
        checkpoint_every=min(base.checkpoint_every, max(1, run.steps // 4)),
    )
    out = cfg.to_dict()
    out["model"] = asdict(size.model)  # written to RUN/model.yaml when the run starts
    return out


def time_sizes(plan: Plan, trials: int = 3) -> None:
    """Fill each size's s_per_step: `trials` timed optimizer steps (after 2 warm-up ones) of the
    real model with AdamW in the runs' precision on this device, plus rendering one batch."""
    from model.diffusion import training_loss
    from train.data.loader import make_dataset
    from train.accelerator import mixed_precision
    from train.speed import adamw

    base = base_train_config(plan.sweep)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = mixed_precision(base.mixed_precision, cuda) == "bf16"
    micro_steps = plan.sweep.processes * base.grad_accum
    micro = plan.sweep.hparams.batch_size // micro_steps
    dataset = make_dataset(replace(base.data, size=micro))
    start = time.perf_counter()
    for i in range(micro):
        dataset[i]
    data_s = (time.perf_counter() - start) * plan.sweep.hparams.batch_size / micro / plan.sweep.processes
    for size in plan.sizes.values():
        model = DiT.from_dit_config(size.model).to(device)
        opt = adamw(model.parameters(), 1e-4, 0.0)  # the runs' optimizer (train.speed)
        x = torch.randn(micro, *plan.latent, device=device)
        kwargs = {}
        if size.model.text_dim:
            from model.text_encoder import MAX_LENGTH

            kwargs = {
                "context": torch.randn(micro, MAX_LENGTH, size.model.text_dim, device=device),
                "context_mask": torch.ones(micro, MAX_LENGTH, dtype=torch.bool, device=device),
            }
        for i in range(2 + trials):
            if i == 2:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = training_loss(model, x, base.diffusion, **kwargs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        size.s_per_step = (time.perf_counter() - start) / trials * base.grad_accum + data_s
