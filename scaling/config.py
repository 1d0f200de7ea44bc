"""A scaling sweep's configuration: the model family, the budgets and sizes, the per-size rules.

    ministack scaling sweep configs/scaling/cpu.yaml --set hparams.batch_size=16

One YAML file (or a preset name: `cpu`, `gpu-1`, `gpu-8` are configs/scaling/NAME.yaml) holds:

- `family`: DiT sizes from one knob, the depth: width = aspect · depth (a multiple of the fixed
  head size), heads = width / head_dim. Parameters grow as depth³.
- `budgets`: a list of {flops, sizes}: each budget's compute in *measured* training FLOPs and the
  depths trained at it (an isoFLOP profile wants 4 or more, centred on the optimum).
- `hparams`: the per-size rule (below) and the global batch.
- `train`: the base run (any `ministack train` field: codec, diffusion, data buckets, precision,
  val_clips...); each run's size, length, LR, warm-up and directory are set by the plan.
- `launcher`, `processes`: how each run starts (default: this Python, one process); e.g.
  `accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8` with `processes: 8`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import yaml

from model.dit import DiTConfig
from train.config import apply_overrides, build_config

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "scaling"
Attention = Literal["full", "factorized"]  # model.dit.DiTConfig.attention


@dataclass
class FamilyConfig:
    """DiT sizes from one knob (depth) at a fixed head size: width = aspect · depth."""

    head_dim: int = 16
    aspect: int = 16  # width per unit of depth (nanochat's rule: width = 64 · depth)
    patch_size: list = field(default_factory=lambda: [1, 4, 4])
    mlp_ratio: float = 4.0
    text_dim: int = 0  # 0: unconditional; 384: cross-attention to the shipped text encoder
    attention: Attention = "full"

    def width(self, depth: int) -> int:
        """aspect · depth, rounded to the nearest multiple of head_dim (at least one head)."""
        return max(1, round(self.aspect * depth / self.head_dim)) * self.head_dim

    def model(self, depth: int, in_channels: int) -> DiTConfig:
        """The family's DiT at `depth` for latents of `in_channels` channels."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        d = self.width(depth)
        return DiTConfig(
            in_channels=in_channels,
            patch_size=tuple(self.patch_size),
            hidden_size=d,
            depth=depth,
            num_heads=d // self.head_dim,
            mlp_ratio=self.mlp_ratio,
            text_dim=self.text_dim,
            attention=self.attention,
        )


@dataclass
class HyperConfig:
    """Per-size hyperparameters by a stated rule (Porian et al. 2024's fixes to Kaplan's setup):
    AdamW LR = lr · (base_width / width)^lr_width_exponent (μP's 1/width for Adam's hidden
    layers at exponent 1), linear warm-up over `warmup_tokens_per_param` · N tokens (capped at
    max_warmup_fraction of the run), cosine decay to zero at the run's own last step."""

    lr: float = 2.0e-3  # at base_width
    base_width: int = 64
    lr_width_exponent: float = 1.0
    warmup_tokens_per_param: float = 1.0
    max_warmup_fraction: float = 0.25
    batch_size: int = 32  # global: samples per optimizer step over all processes
    min_steps: int = 50  # a run shorter than this is refused (its compute could miss the budget by > 1 %)
    lr_multipliers: list = field(default_factory=list)  # e.g. [0.5, 2]: extra runs at the first budget, LR checked

    def lr_at(self, width: int) -> float:
        return self.lr * (self.base_width / width) ** self.lr_width_exponent


@dataclass
class Budget:
    flops: float  # measured training FLOPs per run
    sizes: list  # depths


@dataclass
class SlurmExecutorConfig:
    """The sweep YAML's `slurm:` section (`--executor slurm`, scaling/slurm.py): what each array task asks for."""

    partition: str | None = None
    account: str | None = None
    time_min: int = 60  # each task's time limit
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    array_parallelism: int = 8  # tasks running at once (sbatch --array=...%N)
    signal_delay_s: int = 90  # SIGUSR2 this long before the limit: checkpoint and requeue
    setup: list = field(default_factory=list)  # shell lines before each task (module load, a venv)
    sbatch: dict = field(default_factory=dict)  # any other sbatch option, e.g. {"constraint": "h100"}


@dataclass
class SweepConfig:
    name: str = "sweep"
    out: str = "runs/scaling"
    family: FamilyConfig = field(default_factory=FamilyConfig)
    hparams: HyperConfig = field(default_factory=HyperConfig)
    budgets: list = field(default_factory=list)  # of {flops, sizes}
    train: dict = field(default_factory=dict)  # base `ministack train` fields
    launcher: str = ""  # "" = this Python; else a command that takes `-m train CONFIG` (accelerate launch ...)
    processes: int = 1  # processes per run (what the launcher starts)
    max_hours: float = 0.0  # refuse a plan estimated longer than this (0: no limit)
    slurm: SlurmExecutorConfig = field(default_factory=SlurmExecutorConfig)  # for --executor slurm

    def budget_list(self) -> list[Budget]:
        """`budgets` as Budget objects, checked: positive FLOPs, distinct, sizes positive integers."""
        out = []
        for i, item in enumerate(self.budgets):
            if not isinstance(item, dict) or set(item) != {"flops", "sizes"}:
                raise ValueError(f"budgets[{i}]: expected {{flops: F, sizes: [depth, ...]}}, got {item!r}")
            try:
                flops = float(item["flops"])
            except (TypeError, ValueError):
                raise ValueError(f"budgets[{i}].flops: expected a number of FLOPs, got {item['flops']!r}") from None
            sizes = item["sizes"] if isinstance(item["sizes"], list) else [item["sizes"]]
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
                raise ValueError(f"budgets[{i}].sizes: depths are whole numbers, got {item['sizes']!r}")
            if flops <= 0 or not sizes or min(sizes) < 1:
                raise ValueError(f"budgets[{i}]: flops must be > 0 and sizes a non-empty list of depths >= 1")
            out.append(Budget(flops, sorted(set(sizes))))
        if not out:
            raise ValueError("budgets: the sweep names no compute budgets")
        if len({b.flops for b in out}) != len(out):
            raise ValueError("budgets: two budgets have the same flops")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choices(cfg, prefix: str = "") -> None:
    """Every `Literal` field of a config dataclass (nested ones too) holds one of its values;
    a ValueError naming the field and the values allowed otherwise."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif get_origin(hint) is Literal and value not in get_args(hint):
            allowed = ", ".join(repr(choice) for choice in get_args(hint))
            raise ValueError(f"{prefix}{f.name} must be one of {allowed}, got {value!r}")


def load_sweep_config(name_or_path: str, overrides: list[str] = ()) -> SweepConfig:
    """A SweepConfig from a preset name (configs/scaling/NAME.yaml) or a YAML path, then
    `key=value` overrides (dotted keys, as `ministack train --set`). Raises ValueError naming
    an unknown key, a value out of its field's choices, a bad budget, or a missing file."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if not preset.is_file():
            names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise ValueError(f"no sweep config {name_or_path!r}: not a file nor a preset ({names})")
        path = preset
    cfg = build_config(SweepConfig, yaml.safe_load(path.read_text()) or {})
    apply_overrides(cfg, overrides)
    _check_choices(cfg)
    cfg.budget_list()
    positive = {
        "family.head_dim": cfg.family.head_dim,
        "family.aspect": cfg.family.aspect,
        "hparams.lr": cfg.hparams.lr,
        "hparams.base_width": cfg.hparams.base_width,
        "hparams.batch_size": cfg.hparams.batch_size,
        "hparams.min_steps": cfg.hparams.min_steps,
        "processes": cfg.processes,
        "slurm.time_min": cfg.slurm.time_min,
        "slurm.array_parallelism": cfg.slurm.array_parallelism,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if not all(m > 0 for m in cfg.hparams.lr_multipliers):
        raise ValueError(f"hparams.lr_multipliers must all be > 0, got {cfg.hparams.lr_multipliers}")
    if cfg.hparams.batch_size % cfg.processes:
        raise ValueError(f"hparams.batch_size {cfg.hparams.batch_size} must be a multiple of processes {cfg.processes}")
    if not isinstance(cfg.slurm.sbatch, dict):
        raise ValueError(
            f"slurm.sbatch: a mapping of sbatch options, e.g. {{constraint: h100}}, got {cfg.slurm.sbatch!r}"
        )
    if isinstance(cfg.slurm.setup, str):
        cfg.slurm.setup = [cfg.slurm.setup]
    return cfg
