"""Plan a training run or a serving fleet: tokens, FLOPs, GPU-days, GPUs needed, one figure at a time.

Each figure is computed from the inputs it needs, whatever else is missing:

  tokens               a dataset: --images/--videos, --resolution, --patch (videos also --frames
                       or --fps x --duration); profiling.inputs.tokens_per_sample. x --epochs
  training FLOPs       C = 6·N·D (profiling.laws): --params, --tokens (or the dataset)
  GPU-days             C / (dense peak x MFU) / 86400: also --gpu, --mfu
  wall-clock days      GPU-days / --num-gpus: also --num-gpus
  FLOPs per request    2·N·(prompt + answer): --params, --prompt-tokens, --answer-tokens
  seconds per request  FLOPs per request / (dense peak x utilization): also --gpu, --utilization
  GPUs needed          requests/day x seconds each / (--hours-per-day x 3600): also --requests-per-day

The output holds every figure the inputs give, and under `missing` the flags that would give
each other figure; only when no figure can be computed is it an error, naming what each needs.

The laws omit attention, which dominates at long context: --layers and --d-attn add it (see
train_attention_flops, request_attention_flops). The law figure stays in the output; times and
GPU counts then use law + attention.

Peaks are dense data-sheet figures (profiling.hardware), in bf16 unless --dtype says otherwise,
or in the GPU's own 16-bit tensor format where it has no bf16 (fp16 on T4, V100); --gpu cpu
measures this machine, in its preferred dtype (profiling.cpu). Numbers take suffixes: 175e9,
7B, 135M, 2T, 10k.
"""

from __future__ import annotations

import argparse
import json
import math

from profiling import laws
from profiling.estimate_table import LABELS, format_plan
from profiling.hardware import accelerator, auto_dtype, normalize_dtype
from profiling.inputs import (
    dataset_tokens,
    parse_compression,
    parse_count,
    parse_count_or_zero,
    parse_number,
    parse_patch,
    parse_resolution,
)

SECONDS_PER_DAY = 86400.0
HOURS_PER_DAY = 24.0  # the serving day when --hours-per-day is not given
_SHAPE_FLAGS = ("resolution", "patch", "latent_compression", "frames", "fps", "duration")
_TRAIN_FLAGS = ("tokens", "seq_len", "images", "videos", *_SHAPE_FLAGS, "epochs", "mfu", "num_gpus")
_SERVE_FLAGS = ("prompt_tokens", "answer_tokens", "requests_per_day", "hours_per_day", "utilization")
_INPUTS = ("params", "layers", "d_attn", *_TRAIN_FLAGS, *_SERVE_FLAGS, "gpu", "dtype")
_SERVE_FIGURES = ("flops_per_request", "seconds_per_request", "gpus_needed")


def peak_flops(gpu: str, dtype: str | None = None) -> dict:
    """{'gpu': name, 'dtype', 'peak_flops': dense FLOP/s} of a table GPU ('H100', 'a100') or, for
    'cpu', of this CPU as measured. Without `dtype`, a GPU's is bf16 where it has bf16, else its
    16-bit tensor format, said in a 'dtype_note'; this CPU's is profiling.hardware.auto_dtype's.
    A dtype the GPU lacks raises, naming the ones it has."""
    if gpu.strip().lower() == "cpu":
        from profiling.cpu import cpu_name, cpu_peak_flops  # lazy: the probe imports torch

        chosen = normalize_dtype(dtype) if dtype else auto_dtype("cpu")
        return {"gpu": cpu_name(), "dtype": chosen, "peak_flops": cpu_peak_flops(chosen)}
    acc = accelerator(gpu)
    chosen = normalize_dtype(dtype) if dtype else acc.default_dtype
    out = {"gpu": acc.name, "dtype": chosen, "peak_flops": acc.peak(chosen)}
    if dtype is None and chosen != "bf16":
        out["dtype_note"] = f"{acc.name} has no bf16: using {chosen} (its 16-bit tensor format)"
    return out


def _fraction(flag: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{flag} must be a fraction in (0, 1] (0.4 means 40%), got {value:g}")


def _hours(value: float) -> None:
    if not 0 < value <= 24:
        raise ValueError(f"--hours-per-day must be in (0, 24], got {value:g}")


def train_attention_flops(layers: int, d_attn: int, spans: list[tuple[float, int]]) -> float:
    """PaLM app. B (laws.palm_train_flops_per_token less 6N): 12·layers·d_attn·S FLOPs per
    training token attending over S, summed over `spans` of (tokens, S). 12 = QK^T and AV x 2 FLOPs
    per multiply-add x 3 (forward + backward). Bidirectional, as PaLM counts it (DiT's full attention)."""
    return 12.0 * layers * d_attn * sum(tokens * seq_len for tokens, seq_len in spans)


def request_attention_flops(layers: int, d_attn: int, tokens: int) -> tuple[float, int]:
    """(FLOPs, causal pairs) of one request's attention over its prompt + answer `tokens`:
    4·layers·d_attn·pairs (QK^T and AV, 2 FLOPs per multiply-add), each token seeing itself and all
    earlier ones. Kaplan et al. Table 1's 2·n_layer·n_ctx·d_attn per token equals this causal-averaged
    QK+AV (4·n_layer·d_attn over n_ctx/2 keys): 2·L·d·T² a request, here exactly 2·L·d·T(T+1)."""
    from profiling.measure import attention_pairs  # lazy: profiling.measure imports torch

    pairs = attention_pairs(tokens, tokens, causal=True)
    return 4.0 * layers * d_attn * pairs, pairs


def training(
    params: float,
    tokens: float,
    peak: float | None = None,
    mfu: float | None = None,
    num_gpus: int | None = None,
    attention_flops: float | None = None,
) -> dict:
    """Training compute of N = `params` on D = `tokens`: 6·N·D FLOPs (Kaplan et al. 2020), and with
    `attention_flops` also 6ND + attention, which the times then use. With a `peak` (FLOP/s) and an
    `mfu` (fraction), the GPU time: gpu_seconds = FLOPs / (peak x mfu), gpu_days = that / 86400;
    with `num_gpus` too, wall_days = gpu_days / num_gpus."""
    flops = law = laws.train_flops(params, tokens)
    out: dict = {"params": params, "tokens": tokens, "train_flops": law}
    if attention_flops is not None:
        flops = law + attention_flops
        out.update(train_flops_with_attention=flops, attention_share=attention_flops / flops)
    if peak is None or mfu is None:
        return out
    _fraction("--mfu", mfu)
    gpu_seconds = flops / (peak * mfu)
    out.update(mfu=mfu, gpu_seconds=gpu_seconds, gpu_days=gpu_seconds / SECONDS_PER_DAY)
    if num_gpus is not None:
        out.update(num_gpus=num_gpus, wall_days=out["gpu_days"] / num_gpus)
    return out


def serving(
    params: float,
    prompt_tokens: int,
    answer_tokens: int,
    requests_per_day: float | None = None,
    peak: float | None = None,
    utilization: float | None = None,
    hours_per_day: float = HOURS_PER_DAY,
    attention: tuple[int, int] | None = None,
) -> dict:
    """FLOPs per request: 2·N·(prompt + answer) (Kaplan et al. 2020), and with `attention` =
    (layers, d_attn) also that plus the causal attention of prompt + answer, which the times then
    use. With a `peak` (FLOP/s) and a `utilization` (fraction), seconds per request on one GPU;
    with `requests_per_day` too, the GPUs that serve them within `hours_per_day` (ceil of busy
    GPU-seconds / (hours x 3600))."""
    flops = law = laws.infer_flops(params, prompt_tokens + answer_tokens)
    out: dict = {
        "params": params,
        "prompt_tokens": prompt_tokens,
        "answer_tokens": answer_tokens,
        "flops_per_request": law,
    }
    if attention is not None:
        extra, pairs = request_attention_flops(*attention, prompt_tokens + answer_tokens)
        flops = law + extra
        out.update(attention_pairs_per_request=pairs, flops_per_request_with_attention=flops)
    if peak is None or utilization is None:
        return out
    _fraction("--utilization", utilization)
    seconds = flops / (peak * utilization)
    out.update(utilization=utilization, seconds_per_request=seconds, requests_per_second_per_gpu=1 / seconds)
    if requests_per_day is None:
        return out
    _hours(hours_per_day)
    busy = requests_per_day * seconds / (hours_per_day * 3600)
    return {
        **out,
        "requests_per_day": requests_per_day,
        "hours_per_day": hours_per_day,
        # round first: float noise must not turn exactly 8.0 GPUs into 9
        "gpus_needed": math.ceil(round(busy, 9)),
    }


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check(a: argparse.Namespace) -> None:
    """Raise on contradictory or out-of-range inputs, whichever figures they would feed."""
    if (a.layers is None) != (a.d_attn is None):
        given, other = ("--layers", "--d-attn") if a.d_attn is None else ("--d-attn", "--layers")
        raise ValueError(f"{given} needs {other} to add attention (d_attn = heads x head_dim)")
    dataset = a.images is not None or a.videos is not None
    shape = [k for k in _SHAPE_FLAGS if getattr(a, k) is not None]
    video = [k for k in shape if k in ("frames", "fps", "duration")]
    if a.tokens is not None and dataset:
        raise ValueError("give --tokens or a dataset (--images/--videos), not both")
    if a.seq_len is not None and (dataset or a.layers is None):
        raise ValueError(
            "--seq-len (attention length) goes with --tokens, --layers and --d-attn; "
            "a dataset's is its tokens per sample"
        )
    if shape and not dataset:
        raise ValueError(f"dataset flags {', '.join(map(_flag, shape))} need --images or --videos")
    if video and a.videos is None:
        raise ValueError(f"video flags {', '.join(map(_flag, video))} need --videos")
    for flag, value in (("--mfu", a.mfu), ("--utilization", a.utilization)):
        if value is not None:
            _fraction(flag, value)
    if a.hours_per_day is not None:
        _hours(a.hours_per_day)


def _needs(a: argparse.Namespace) -> dict[str, tuple[str | None, list[str]]]:
    """Each figure the flags can lead to -> (the figure it builds on, the flags it adds to that one
    that are not given). A figure is computed when it and everything below it lack nothing."""

    def absent(*dests: str) -> list[str]:
        return [_flag(d) for d in dests if getattr(a, d) is None]

    dataset = a.images is not None or a.videos is not None
    needs: dict[str, tuple[str | None, list[str]]] = {}
    if dataset:
        frames = []
        if a.videos is not None and a.frames is None:
            lacking = absent("fps", "duration")
            frames = ["--frames (or --fps and --duration)"] if len(lacking) == 2 else lacking
        needs["tokens"] = (None, absent("resolution", "patch") + frames)
    tokens = [] if dataset or a.tokens is not None else ["--tokens (or --images/--videos, --resolution, --patch)"]
    needs["train_flops"] = ("tokens" if dataset else None, absent("params") + tokens)
    timed = "train_flops"
    if a.layers is not None:
        seq_len = a.tokens is not None and a.seq_len is None
        needs["train_flops_with_attention"] = (
            timed,
            ["--seq-len (tokens each token attends over, for --layers/--d-attn)"] if seq_len else [],
        )
        timed = "train_flops_with_attention"
    needs["gpu_days"] = (timed, absent("gpu", "mfu"))
    needs["wall_days"] = ("gpu_days", absent("num_gpus"))
    needs["flops_per_request"] = (None, absent("params", "prompt_tokens", "answer_tokens"))
    needs["seconds_per_request"] = ("flops_per_request", absent("gpu", "utilization"))
    needs["gpus_needed"] = ("seconds_per_request", absent("requests_per_day"))
    return needs


def missing(a: argparse.Namespace) -> dict[str, list[str]]:
    """Each figure the flags can lead to -> every flag it still lacks ([] when it is computed)."""
    gaps: dict[str, list[str]] = {}
    for name, (below, own) in _needs(a).items():
        gaps[name] = (gaps[below] if below else []) + own
    return gaps


def _asked(a: argparse.Namespace, figures: list[str]) -> list[str]:
    """The figures to report as missing: those of training or of serving when only that side's
    flags are given (--params, --gpu, --dtype, --layers, --d-attn serve both), else all."""
    train = any(getattr(a, k) is not None for k in _TRAIN_FLAGS)
    serve = any(getattr(a, k) is not None for k in _SERVE_FLAGS)
    return figures if train == serve else [f for f in figures if (f in _SERVE_FIGURES) == serve]


def _nothing_to_estimate(a: argparse.Namespace, figures: list[str]) -> ValueError:
    """The error for inputs that give no figure: the given flags, then each chain of figures, the
    first with all it lacks and each next one with what it adds."""
    needs = _needs(a)
    given = [_flag(k) for k in _INPUTS if getattr(a, k) is not None]
    parts = []
    for f in figures:
        below, own = needs[f]
        if own:
            parts.append(f"{LABELS[f]} {'need' if below is None else 'also'} {', '.join(own)}")
    return ValueError(f"nothing to estimate{' from ' + ', '.join(given) if given else ''}: " + "; ".join(parts))


def _spans(a: argparse.Namespace, out: dict) -> list[tuple[float, int | None]]:
    """(tokens per epoch, the length they attend over) per kind of sample: --tokens with --seq-len,
    or each kind of the dataset with its tokens per sample; `out` gains the dataset's counts."""
    if a.tokens is not None:
        return [(a.tokens, a.seq_len)]
    frames = a.frames if a.frames is not None else (a.fps or 0) * (a.duration or 0)
    counted = dataset_tokens(
        a.resolution, a.patch, a.latent_compression or (1, 1, 1), a.images, a.videos, max(1, round(frames))
    )
    del counted["tokens_per_epoch"]
    out.update(counted)
    return [
        (out[kind + "s"] * out[f"tokens_per_{kind}"], out[f"tokens_per_{kind}"])
        for kind in ("image", "video")
        if f"tokens_per_{kind}" in out
    ]


def plan(a: argparse.Namespace) -> dict:
    """Every figure the given flags allow, as one flat dict (the --json object) with the inputs
    used and `missing`: for each figure not computed, the flags that would give it. Raises
    ValueError on contradictory inputs, and when no figure can be computed."""
    _check(a)
    gaps = missing(a)
    asked = _asked(a, list(gaps))
    if all(gaps.values()):
        raise _nothing_to_estimate(a, asked)
    out: dict = {
        "params": a.params,
        **(peak_flops(a.gpu, a.dtype) if a.gpu is not None else {}),
        "layers": a.layers,
        "d_attn": a.d_attn,
    }
    peak = out.get("peak_flops")
    attn = (a.layers, a.d_attn) if a.layers is not None else None
    if a.tokens is not None or gaps.get("tokens") == []:
        epochs = a.epochs or 1.0
        spans = _spans(a, out)
        # tokens seen is a whole count (a fraction of an epoch still sees whole tokens)
        out.update(tokens=round(sum(n for n, _ in spans) * epochs), epochs=epochs, seq_len=a.seq_len)
        if not gaps["train_flops"]:
            attention = (
                train_attention_flops(*attn, [(n * epochs, s) for n, s in spans])
                if attn and not gaps["train_flops_with_attention"]
                else None
            )
            out.update(
                training(a.params, out["tokens"], None if gaps["gpu_days"] else peak, a.mfu, a.num_gpus, attention)
            )
    if not gaps["flops_per_request"]:
        out.update(
            serving(
                a.params,
                a.prompt_tokens,
                a.answer_tokens,
                a.requests_per_day,
                peak,
                a.utilization,
                a.hours_per_day or HOURS_PER_DAY,
                attn,
            )
        )
    out["missing"] = {f: gaps[f] for f in asked if gaps[f]}
    return {k: v for k, v in out.items() if v is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The estimate flags; names are stable so scripts can drive them."""

    def number(group: argparse._ActionsContainer, flag: str, help: str, parse=parse_number, **kw: object) -> None:
        group.add_argument(flag, type=parse, metavar="N", help=help, **kw)

    def count(group: argparse._ActionsContainer, flag: str, help: str, **kw: object) -> None:
        number(group, flag, help, parse_count, **kw)  # whole numbers: print as ints in --json

    count(parser, "--params", "model parameters N (e.g. 175e9, 7B)")
    count(parser, "--layers", "transformer layers; with --d-attn adds attention to the law")
    count(parser, "--d-attn", "attention width, heads x head_dim (usually d_model)")
    train = parser.add_argument_group("training (6·N·D)")
    count(train, "--tokens", "training tokens D per epoch (or describe a dataset)")
    count(train, "--seq-len", "tokens each token attends over, with --tokens and --layers")
    count(train, "--images", "number of images in the dataset")
    count(train, "--videos", "number of videos in the dataset")
    train.add_argument("--resolution", type=parse_resolution, metavar="HxW", help="sample size in pixels, e.g. 256x256")
    number(train, "--frames", "frames per video (else --fps x --duration)")
    number(train, "--fps", "video frames per second")
    number(train, "--duration", "video length in seconds")
    train.add_argument("--patch", type=parse_patch, metavar="P|pt,ph,pw", help="patch size; P means 1,P,P")
    train.add_argument(
        "--latent-compression",
        type=parse_compression,
        metavar="t,h,w",
        help="latent encoder downsampling (default 1,1,1: patches of pixels)",
    )
    number(train, "--epochs", "passes over the data (default 1)")
    number(train, "--mfu", "model FLOPs utilisation, a fraction (e.g. 0.4); gives GPU-days")
    count(train, "--num-gpus", "GPUs training in parallel; gives wall-clock days")
    serve = parser.add_argument_group("serving (2·N·T per request)")
    count(serve, "--prompt-tokens", "input tokens per request")
    number(
        serve, "--answer-tokens", "generated tokens per request (0: prefill only, e.g. scoring)", parse_count_or_zero
    )
    count(serve, "--requests-per-day", "requests to serve per day; gives GPUs needed")
    number(serve, "--hours-per-day", f"hours a day the fleet serves (default {HOURS_PER_DAY:g})")
    number(serve, "--utilization", "fraction of the dense peak achieved (e.g. 0.3); gives seconds per request")
    parser.add_argument("--gpu", help="H100, h100-sxm, A100, L4, V100, T4, ... or 'cpu' (measured here)")
    parser.add_argument(
        "--dtype",
        help="compute dtype for the peak (default bf16, or the GPU's 16-bit "
        "tensor format where it has no bf16: fp16 on T4, V100)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    """Print the plan; bad inputs, or none that give a figure, raise ValueError (one error line, exit 2)."""
    p = plan(args)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
