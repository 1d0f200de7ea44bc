"""A training run's configuration: one YAML file, overridable from the command line.

ministack train configs/train/tiny.yaml --set max_steps=200 --set data.batch_size=4
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    kind: str = "procedural"  # "procedural" (ships with the code), "digits" (moving handwritten digits),
    # "fashion" (moving Fashion-MNIST items: Debian's dataset-fashion-mnist) or "folder" (folder / CSV / JSONL)
    source: str = ""  # kind=folder: the folder / CSV / JSONL; kind=fashion: the IDX files' directory (default $MINISTACK_FASHION_MNIST, else Debian's)
    size: int = 4096  # procedural / digits / fashion clips
    seed: int = 0
    buckets: list = field(default_factory=lambda: [[1, 32, 32], [5, 32, 32]])  # (frames, height, width)
    batch_size: int = 8  # per process, per micro-step
    bucket_batch_size: dict = field(default_factory=dict)  # "5x32x32": 4 overrides batch_size for a bucket
    num_workers: int = 0


@dataclass
class VAEConfig:
    """The VAE stage (`ministack train vae`): train the codec, then point `codec` at `out`."""

    init: str = "tiny"  # "tiny" (seeded, untrained) or a codec directory to fine-tune
    steps: int = 1000
    lr: float = 1.0e-3
    warmup_steps: int = 50
    kl_weight: float = 1.0e-6
    out: str = ""  # default RUN_DIR/codec


@dataclass
class SlurmConfig:
    """Where `ministack train --slurm` runs the job (train.slurm writes the batch script). One
    task per node, each an accelerate (or torchrun) node: machine rank SLURM_PROCID, rendezvous
    on the job's first host. Launch-only: it does not change what is trained (a sweep's config hash leaves it out)."""

    nodes: int = 1
    ntasks: int | None = None  # accelerate nodes in all (default: nodes; 2 on 1 node tests multi-node on one host)
    gpus_per_node: int = 0
    processes_per_node: int | None = None  # training processes per node (default: gpus_per_node, or 1)
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "64G"
    time: str = "01:00:00"  # the job's time limit
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None  # default: the run directory's name
    launcher: str = "accelerate"  # or "torchrun" (DeepSpeed then from the run's `deepspeed:` JSON)
    accelerate_config: str | None = (
        None  # default configs/accelerate/ddp.yaml; ZeRO configs work unchanged across nodes
    )
    signal_s: int = 120  # SIGUSR1 this long before the time limit: checkpoint, then requeue
    requeue: bool = True
    setup: list = field(default_factory=list)  # shell lines before the launch (module load, source a venv)
    sbatch: list = field(default_factory=list)  # extra `#SBATCH` options, e.g. "--constraint=h100"


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    model: str = "tiny"  # model.configs preset or YAML
    codec: str = "identity"  # "identity", "tiny" or a codec / diffusers VAE directory
    text_encoder: str | None = None  # None: the shipped all-MiniLM-L6-v2
    diffusion: str = "flow"  # "flow" or "ddpm"
    sigma_sampling: str = "logit_normal"  # flow's training sigmas: "logit_normal" (SD3) or "uniform"
    sigma_shift: float = 1.0  # SD3's time shift of the training sigmas (> 1: towards noise)
    data: DataConfig = field(default_factory=DataConfig)
    latent_cache: str = ""  # a directory: encode the data once there (train.data.latents), train on the cache
    cache_dtype: str = (
        "float32"  # of the cached tensors: float32 trains exactly as from pixels; float16 halves the disk
    )
    vae: VAEConfig = field(default_factory=VAEConfig)
    cond_drop: float = 0.1  # fraction of captions replaced by "" (what classifier-free guidance needs)
    seed: int = 0
    max_steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU and on CPUs where it is safe and fast), "no", "bf16"
    gradient_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: only at the end
    val_clips: int = 8  # held-out clips of the validation loss (its standard error shrinks as 1/sqrt of this)
    eval_prompts: int = 8  # text-alignment prompts sampled per evaluation (more: a less noisy score)
    eval_sampling_steps: int = 20
    eval_guidance: float = 4.0  # classifier-free guidance scale of the evaluation's samples (1 = off)
    # noise levels [lo, hi] (0 clean, 1 pure noise) at which that guidance applies; the rest unguided
    eval_guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    nonfinite: str = "skip"  # a step with a non-finite loss or gradient norm: "skip" it (no update) or "stop" the run
    max_nonfinite_steps: int = 3  # with "skip": this many consecutive skipped steps, then the run stops
    deepspeed: str | None = (
        None  # a DeepSpeed JSON config (ZeRO stage etc.) for launchers without an accelerate config (torchrun)
    )
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # used by `ministack train --slurm` only

    def to_dict(self) -> dict:
        return asdict(self)

    def check_buckets(self, stage: str = "dit") -> None:
        """Refuse, before anything loads, a bucket the stage cannot train on, naming the nearest
        sizes that fit. The VAE stage needs the sizes its codec (vae.init) takes; the cache and
        DiT stages need those of `codec` times the model's patch. Read from configs alone."""
        from model.configs import load_config
        from model.sizes import SizeError, SizeRule
        from model.vae import codec_compression
        from train.data.buckets import parse_bucket

        if stage == "vae":
            rule = SizeRule(codec_compression(self.vae.init))
        else:
            rule = SizeRule(codec_compression(self.codec), load_config(self.model).patch_size)
        buckets = [parse_bucket(b) for b in self.data.buckets]
        for bucket in buckets:
            try:
                rule.latent(bucket)
            except SizeError as err:
                raise SizeError(f"data.buckets: bucket {'x'.join(map(str, bucket))}: {err}", err.suggestions) from None
        # a per-bucket batch size left from a YAML whose buckets an override replaced
        stray = [str(b) for b in self.data.bucket_batch_size if parse_bucket(b) not in buckets]
        if stray:
            raise ValueError(
                f"data.bucket_batch_size names buckets not in data.buckets: {', '.join(stray)} "
                f"(buckets: {', '.join('x'.join(map(str, b)) for b in buckets)}); "
                f"drop it with --set data.bucket_batch_size={{}}"
            )


def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices)


# Every value rule of a training config, by dotted key: (test, the allowed values in words). Types
# come from the dataclasses' annotations (`_check_type`); the buckets' sizes from `check_buckets`.
# A rule here is what makes a bad value fail before anything loads, instead of as a traceback (or
# silently: an EMA decay of 1.5 diverges, a cond_drop of 2 drops every caption) minutes later.
RULES = {
    "max_steps": _at_least(1),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": _at_least(0),
    "warmup_steps": _at_least(0),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "grad_accum": _at_least(1),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "cond_drop": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "log_every": _at_least(1),
    "checkpoint_every": _at_least(1),
    "keep_checkpoints": _at_least(1),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "val_clips": _at_least(1),
    "eval_prompts": _at_least(1),
    "eval_sampling_steps": _at_least(1),
    "eval_guidance": (lambda v: v >= 0, ">= 0 (1: no guidance)"),
    "eval_guidance_interval": (
        lambda v: len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and 0 <= v[0] <= v[1] <= 1,
        "[lo, hi] with 0 <= lo <= hi <= 1",
    ),
    "diffusion": _one_of("flow", "ddpm"),
    "sigma_sampling": _one_of("logit_normal", "uniform"),
    "sigma_shift": (lambda v: v > 0, "> 0"),
    "mixed_precision": _one_of("auto", "no", "bf16"),
    "cache_dtype": _one_of("float32", "float16"),
    "nonfinite": _one_of("skip", "stop"),
    "max_nonfinite_steps": _at_least(0),
    "data.kind": _one_of("procedural", "digits", "folder", "fashion"),
    "data.size": _at_least(1),
    "data.batch_size": _at_least(1),
    "data.num_workers": _at_least(0),
    "vae.steps": _at_least(1),
    "vae.lr": (lambda v: v > 0, "> 0"),
    "vae.warmup_steps": _at_least(0),
    "vae.kl_weight": _at_least(0),
}


def _type_name(kind) -> str:
    return "null" if kind is type(None) else kind.__name__


def _check_type(key: str, hint, value):
    """`value` as the annotated type `hint` of field `key` (an int where a float is expected becomes
    a float); a ValueError naming the key, the expected type and the value otherwise. Floats must be
    finite: an infinite or NaN setting is never meant."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for kind in kinds:
        kind = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool, list, dict) and isinstance(value, kind):
            return value
    expected = " or ".join(_type_name(typing.get_origin(k) or k) for k in kinds)
    raise ValueError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")


def validate(cfg, prefix: str = "") -> None:
    """Check every field of a config dataclass (nested ones too) against its type and RULES,
    before any work: a ValueError naming the key and the allowed values. Ints given for float
    fields are made floats in place."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if is_dataclass(value):
            validate(value, key + ".")
            continue
        value = _check_type(key, hints[f.name], value)
        setattr(cfg, f.name, value)
        if key in RULES:
            test, allowed = RULES[key]
            if not test(value):
                raise ValueError(f"{key}: must be {allowed}, got {value!r}")


def _coerce(default, value):
    """YAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`): numbers follow the field's type.
    It reads an unquoted `no` as False: a string field given a boolean is an error saying so."""
    if isinstance(default, str) and isinstance(value, bool):
        raise ValueError(f'expected a string, got the YAML boolean {value}: quote it (e.g. "no")')
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        return int(number) if isinstance(default, int) else number
    return value


def set_override(obj, key: str, raw: str, prefix: str = "") -> None:
    """Apply one `--set key=value` to a config dataclass: dotted keys descend into nested
    dataclasses and into free-form mappings (where the value is read as YAML). `prefix`: the
    dotted path to `obj`, for error messages."""
    head, _, rest = key.partition(".")
    if isinstance(obj, dict):
        if rest:
            return set_override(obj.setdefault(head, {}), rest, raw)
        obj[head] = yaml.safe_load(raw)
        return None
    names = {f.name: f for f in fields(obj)}
    if head not in names:
        raise ValueError(f"unknown config key {prefix + key!r} (known: {', '.join(names)})")
    if rest:
        return set_override(getattr(obj, head), rest, raw, f"{prefix}{head}.")
    default = getattr(obj, head)
    # a string field takes the text as given: YAML would read `--set mixed_precision=no` as False
    try:
        setattr(obj, head, raw if isinstance(default, str) else _coerce(default, yaml.safe_load(raw)))
    except ValueError as err:
        raise ValueError(f"{prefix}{key}: {err}") from None
    return None


def apply_overrides(cfg, overrides: list[str]) -> None:
    """Each `key=value` of `overrides` through set_override, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        set_override(cfg, key.strip(), raw)


def build_config(cls, values: dict):
    """A config dataclass `cls` from a mapping (nested dataclasses from nested mappings); unknown
    keys are an error naming them, numbers and strings are coerced to the field's type."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name) if name in known else None
        try:
            kwargs[name] = build_config(type(default), value) if is_dataclass(default) else _coerce(default, value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return cls(**kwargs)


def load_train_config(path: str | Path | None, overrides: list[str] = (), stage: str = "dit") -> TrainConfig:
    """A TrainConfig from YAML (None: defaults), then `key=value` overrides (dotted keys); its
    buckets checked for `stage` ("vae", "cache" or "dit": `TrainConfig.check_buckets`) and its
    `deepspeed` file found; every field checked against its type and RULES first (`validate`).
    Raises ValueError naming the field."""
    cfg = build_config(TrainConfig, yaml.safe_load(Path(path).read_text()) or {}) if path else TrainConfig()
    apply_overrides(cfg, overrides)
    validate(cfg)
    cfg.check_buckets(stage)
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise ValueError(f"deepspeed: {cfg.deepspeed!r} is not a file (a DeepSpeed JSON config)")
    return cfg
