"""Plan a training run or a serving fleet: FLOPs, GPU-days, GPUs needed.

Training: C = 6·N·D (profiling.laws). D is --tokens, or is counted from a dataset of images
and/or videos (--resolution, --patch, --latent-compression, --frames or --fps x --duration),
times --epochs. GPU-days = C / (dense peak x MFU) / 86400; wall-clock days = that / --num-gpus.

Serving: each request costs 2·N·(prompt + answer) FLOPs; at the dense peak x --utilization that
is a time per request on one GPU, and the daily requests spread over --hours-per-day give the
GPUs needed.

The laws omit attention, which dominates at long context: --layers and --d-attn add it (see
train_attention_flops, request_attention_flops). The law figure stays in the output; times and
GPU counts then use law + attention.

Peaks are dense data-sheet figures (profiling.hardware); --gpu cpu measures this machine.
Numbers take suffixes: 175e9, 7B, 135M, 2T, 10k.
"""

from __future__ import annotations

import argparse
import json
import math

from profiling import laws
from profiling.hardware import accelerator, normalize_dtype

SECONDS_PER_DAY = 86400.0
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_TRAIN_FLAGS = ("tokens", "seq_len", "images", "videos", "resolution", "patch", "latent_compression",
                "frames", "fps", "duration", "epochs", "mfu")
_SERVE_FLAGS = ("prompt_tokens", "answer_tokens", "requests_per_day", "utilization")


class InputError(argparse.ArgumentTypeError, ValueError):
    """A malformed value. argparse prints an ArgumentTypeError's message verbatim (a plain
    ValueError becomes "invalid <function> value"); Python callers can catch ValueError."""


def parse_number(text: str) -> float:
    """'175e9', '1.5e12', '7B', '135M', '2T', '10k' -> a positive finite float."""
    text = str(text).strip()
    scale = _SUFFIX.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"expected a positive number like 175e9, 1.5e12, 7B or 10k, got {text!r}")
    return value


def parse_count(text: str) -> int:
    """parse_number for whole counts (GPUs, tokens, layers): '8k' -> 8000; '0.5' is an error."""
    value = parse_number(text)
    if abs(value - round(value)) > 1e-9 * value:  # 1.1k = 1100.0000000000002 is whole
        raise InputError(f"expected a whole number like 64, 8k or 7B, got {text!r}")
    return round(value)


def _positive_ints(text: str, sep: str, lengths: tuple[int, ...], expected: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.lower().split(sep))
    except ValueError:
        values = ()
    if len(values) not in lengths or min(values) < 1:
        raise InputError(f"expected {expected}, got {text!r}")
    return values


def parse_resolution(text: str) -> tuple[int, int]:
    """'256x256' -> (height, width)."""
    return _positive_ints(text, "x", (2,), "a resolution HxW like 256x256")  # type: ignore[return-value]


def parse_patch(text: str) -> tuple[int, int, int]:
    """'2' -> (1, 2, 2): a single P patches space only; 'pt,ph,pw' sets all three."""
    values = _positive_ints(text, ",", (1, 3), "a patch size P or pt,ph,pw like 2 or 1,2,2")
    return (1, values[0], values[0]) if len(values) == 1 else values  # type: ignore[return-value]


def parse_compression(text: str) -> tuple[int, int, int]:
    """'4,8,8' -> (t, h, w): how many frames/pixels one latent element stands for per axis."""
    return _positive_ints(text, ",", (3,), "a latent compression t,h,w like 4,8,8")  # type: ignore[return-value]


def tokens_per_sample(frames: int, height: int, width: int,
                      patch: tuple[int, int, int] = (1, 1, 1),
                      compression: tuple[int, int, int] = (1, 1, 1)) -> int:
    """Tokens one sample becomes: ceil(T/ct/pt) · ceil(H/ch/ph) · ceil(W/cw/pw).

    Each axis is compressed by the latent encoder, then cut into patches. Sizes that do not
    divide are rounded up (ceil division), because patch embedders pad the remainder rather
    than drop it; ceil(ceil(a/c)/p) == ceil(a/(c·p)), so one division per axis is exact.
    An image is a one-frame sample: ceil(H/ch/ph)·ceil(W/cw/pw), H·W/P² when uncompressed.
    Causal video VAEs that keep the first frame apart (1 + (T-1)/ct) can differ by one latent frame.
    """
    sizes = (frames, height, width)
    return math.prod(-(-size // (c * p)) for size, c, p in zip(sizes, compression, patch))


def dataset_tokens(resolution: tuple[int, int], patch: tuple[int, int, int],
                   compression: tuple[int, int, int] = (1, 1, 1), images: float | None = None,
                   videos: float | None = None, frames: int = 1) -> dict:
    """Tokens in one pass over `images` and `videos` of one resolution, with the per-sample
    counts behind the total so a planner can check them."""
    h, w = resolution
    out: dict = {"resolution": f"{h}x{w}", "patch": list(patch), "latent_compression": list(compression),
                 "images": images, "videos": videos, "frames": None if videos is None else frames,
                 "tokens_per_epoch": 0}
    for kind, count, length in (("image", images, 1), ("video", videos, frames)):
        if count is not None:
            out[f"tokens_per_{kind}"] = tokens_per_sample(length, h, w, patch, compression)
            out["tokens_per_epoch"] += count * out[f"tokens_per_{kind}"]
    return out


def peak_flops(gpu: str, dtype: str = "bf16") -> tuple[str, float]:
    """(name, dense peak FLOP/s) of a table GPU ('H100', 'a100'), or of this CPU for 'cpu'."""
    if gpu.strip().lower() == "cpu":
        from profiling.cpu import cpu_name, cpu_peak_flops  # lazy: the probe imports torch

        return cpu_name(), cpu_peak_flops(normalize_dtype(dtype))
    acc = accelerator(gpu)
    return acc.name, acc.peak(dtype)


def _fraction(flag: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{flag} must be a fraction in (0, 1] (0.4 means 40%), got {value:g}")


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


def training(params: float, tokens: float, peak: float, mfu: float, num_gpus: int = 1,
             attention_flops: float | None = None) -> dict:
    """Compute and time of training N params on D tokens at `mfu` of a `peak` FLOP/s device;
    with `attention_flops` the times use 6ND + attention, and both figures are reported."""
    _fraction("--mfu", mfu)
    flops = law = laws.train_flops(params, tokens)
    out = {"params": params, "tokens": tokens, "mfu": mfu, "num_gpus": num_gpus, "train_flops": law}
    if attention_flops is not None:
        flops = law + attention_flops
        out.update(train_flops_with_attention=flops, attention_share=attention_flops / flops)
    gpu_seconds = flops / (peak * mfu)
    gpu_days = gpu_seconds / SECONDS_PER_DAY
    return {**out, "gpu_seconds": gpu_seconds, "gpu_days": gpu_days, "wall_days": gpu_days / num_gpus}


def serving(params: float, prompt_tokens: int, answer_tokens: int, requests_per_day: float,
            peak: float, utilization: float, hours_per_day: float = 24,
            attention: tuple[int, int] | None = None) -> dict:
    """Per-request cost and the GPUs that serve `requests_per_day` within `hours_per_day`;
    `attention` = (layers, d_attn) adds the causal attention of prompt + answer."""
    _fraction("--utilization", utilization)
    if not 0 < hours_per_day <= 24:
        raise ValueError(f"--hours-per-day must be in (0, 24], got {hours_per_day:g}")
    flops = law = laws.infer_flops(params, prompt_tokens + answer_tokens)
    out = {"params": params, "prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens,
           "requests_per_day": requests_per_day, "hours_per_day": hours_per_day,
           "utilization": utilization, "flops_per_request": law}
    if attention is not None:
        extra, pairs = request_attention_flops(*attention, prompt_tokens + answer_tokens)
        flops = law + extra
        out.update(attention_pairs_per_request=pairs, flops_per_request_with_attention=flops)
    seconds = flops / (peak * utilization)
    busy = requests_per_day * seconds / (hours_per_day * 3600)
    return {**out, "seconds_per_request": seconds, "requests_per_second_per_gpu": 1 / seconds,
            # round first: float noise must not turn exactly 8.0 GPUs into 9
            "gpus_needed": math.ceil(round(busy, 9))}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _training_gaps(a: argparse.Namespace) -> list[str]:
    """The training inputs still missing, as flags; raises on contradictory ones."""
    dataset = a.images is not None or a.videos is not None
    shape = [k for k in ("resolution", "patch", "latent_compression", "frames", "fps", "duration")
             if getattr(a, k) is not None]
    video = [k for k in shape if k in ("frames", "fps", "duration")]
    if a.tokens is not None and dataset:
        raise ValueError("give --tokens or a dataset (--images/--videos), not both")
    if a.seq_len is not None and (dataset or a.layers is None):
        raise ValueError("--seq-len (attention length) goes with --tokens, --layers and --d-attn; "
                         "a dataset's is its tokens per sample")
    if shape and not dataset:
        raise ValueError(f"dataset flags {', '.join(map(_flag, shape))} need --images or --videos")
    if video and a.videos is None:
        raise ValueError(f"video flags {', '.join(map(_flag, video))} need --videos")
    gaps = ["--params"] if a.params is None else []
    if a.tokens is None and not dataset:
        gaps.append("--tokens (or --images/--videos)")
    if a.layers is not None and a.tokens is not None and a.seq_len is None:
        gaps.append("--seq-len (tokens each token attends over, for --layers/--d-attn)")
    if dataset:
        gaps += [_flag(k) for k in ("resolution", "patch") if getattr(a, k) is None]
    if a.videos is not None and a.frames is None:
        lacking = [_flag(k) for k in ("fps", "duration") if getattr(a, k) is None]
        gaps += ["--frames (or --fps and --duration)"] if len(lacking) == 2 else lacking
    return gaps + [_flag(k) for k in ("gpu", "mfu") if getattr(a, k) is None]


def plan(a: argparse.Namespace) -> dict:
    """Every figure the given flags ask for, as one flat dict (the --json object)."""
    if (a.layers is None) != (a.d_attn is None):
        given, other = ("--layers", "--d-attn") if a.d_attn is None else ("--d-attn", "--layers")
        raise ValueError(f"{given} needs {other} to add attention (d_attn = heads x head_dim)")
    want_train = any(getattr(a, k) is not None for k in _TRAIN_FLAGS)
    want_serve = any(getattr(a, k) is not None for k in _SERVE_FLAGS)
    if not (want_train or want_serve):
        raise ValueError("nothing to estimate. Training needs --params, --tokens (or --images/"
                         "--videos with --resolution, --patch), --gpu, --mfu; serving needs "
                         "--params, --prompt-tokens, --answer-tokens, --requests-per-day, "
                         "--gpu, --utilization")
    problems = []
    if want_train and (gaps := _training_gaps(a)):
        problems.append("training estimate needs: " + ", ".join(gaps))
    serve_inputs = ("params", "prompt_tokens", "answer_tokens", "requests_per_day", "gpu", "utilization")
    if want_serve and (gaps := [_flag(k) for k in serve_inputs if getattr(a, k) is None]):
        problems.append("serving estimate needs: " + ", ".join(gaps))
    if problems:
        raise ValueError("; ".join(problems))

    gpu, peak = peak_flops(a.gpu, a.dtype)
    attn = (a.layers, a.d_attn) if a.layers is not None else None
    out: dict = {"params": a.params, "gpu": gpu, "dtype": normalize_dtype(a.dtype), "peak_flops": peak,
                 "layers": a.layers, "d_attn": a.d_attn}
    if want_train:
        tokens, epochs = a.tokens, a.epochs or 1.0
        spans = [(tokens, a.seq_len)]  # (tokens, sequence length each attends over) per kind
        if tokens is None:
            frames = a.frames if a.frames is not None else (a.fps or 0) * (a.duration or 0)
            out.update(dataset_tokens(a.resolution, a.patch, a.latent_compression or (1, 1, 1),
                                      a.images, a.videos, max(1, round(frames))))
            tokens = out.pop("tokens_per_epoch")
            spans = [(out[kind + "s"] * out[f"tokens_per_{kind}"], out[f"tokens_per_{kind}"])
                     for kind in ("image", "video") if f"tokens_per_{kind}" in out]
        attention = train_attention_flops(*attn, [(n * epochs, s) for n, s in spans]) if attn else None
        # tokens seen is a whole count (a fraction of an epoch still sees whole tokens)
        out.update(training(a.params, round(tokens * epochs), peak, a.mfu, a.num_gpus, attention),
                   epochs=epochs, seq_len=a.seq_len)
    if want_serve:
        out.update(serving(a.params, a.prompt_tokens, a.answer_tokens, a.requests_per_day,
                           peak, a.utilization, a.hours_per_day, attn))
    return {k: v for k, v in out.items() if v is not None}


def _count(x: float) -> str:
    """175e9 -> '175B', 1500 -> '1,500': the same suffixes the flags accept."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:,.0f}" if x == int(x) else f"{x:.4g}"


def _ints(values: list[int]) -> str:
    return ",".join(map(str, values))


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.4g}"


def _with_attention(law_label: str, law: float, total: float | None, per: str, attention: str) -> list:
    """The law's compute row; with attention also the attention and total rows, the total
    marked as the figure the times below use."""
    rows = [(f"compute ({law_label})", f"{law:.3e} FLOPs{per}")]
    if total is not None:
        rows += [("attention", f"{total - law:.3e} FLOPs{per}: {attention}"),
                 (f"compute ({law_label} + attention)", f"{total:.3e} FLOPs{per} "
                  f"({(total - law) / total:.1%} attention), used below")]
    return rows


def format_plan(p: dict) -> str:
    """The human table: one aligned row per figure, units spelled out."""
    device = f"{p['gpu']} {p['dtype']}, {p['peak_flops'] / 1e12:.4g} TFLOP/s dense peak"
    arch = f"{p.get('layers')} layers x d_attn {p.get('d_attn')}"
    rows: list[tuple[str, str]] = []
    if "train_flops" in p:
        rows.append(("TRAINING", ""))
        for kind in ("image", "video"):
            if f"tokens_per_{kind}" in p:
                frames = f", {p['frames']} frames" if kind == "video" else ""
                rows.append((f"tokens per {kind}", f"{p[f'tokens_per_{kind}']:,} ({p['resolution']}{frames}, "
                             f"patch {_ints(p['patch'])}, latent compression {_ints(p['latent_compression'])}) "
                             f"x {_count(p[kind + 's'])} {kind}s"))
        epochs = f" ({_num(p['epochs'])} epochs)" if p["epochs"] != 1 else ""
        rows += [("parameters", _count(p["params"])), ("tokens", _count(p["tokens"]) + epochs),
                 *_with_attention("6ND", p["train_flops"], p.get("train_flops_with_attention"), "",
                                  f"12 x {arch} x S per token (PaLM, bidirectional), S = "
                                  + (f"{p['seq_len']:,}" if "seq_len" in p else "tokens per sample")),
                 ("accelerator", f"{device}, MFU {p['mfu'] * 100:.4g}%"),
                 ("GPU time", f"{_num(p['gpu_days'])} GPU-days ({p['gpu_seconds']:.3e} GPU-seconds)"),
                 ("wall clock", f"{_num(p['wall_days'])} days on {_count(p['num_gpus'])} "
                                f"GPU{'s' if p['num_gpus'] != 1 else ''}")]
    if "flops_per_request" in p:
        rows += [("SERVING", ""), ("parameters", _count(p["params"])),
                 ("tokens per request", f"{_count(p['prompt_tokens'])} prompt + {_count(p['answer_tokens'])} answer"),
                 *_with_attention("2NT", p["flops_per_request"], p.get("flops_per_request_with_attention"),
                                  " per request", f"4 x {arch} x "
                                  f"{p.get('attention_pairs_per_request', 0):,} causal (query, key) pairs"),
                 ("accelerator", f"{device}, utilization {p['utilization'] * 100:.4g}%"),
                 ("time per request", f"{_num(p['seconds_per_request'])} s on one GPU "
                  f"({_num(p['requests_per_second_per_gpu'])} requests/s per GPU)"),
                 ("load", f"{_count(p['requests_per_day'])} requests/day over {_num(p['hours_per_day'])} h/day"),
                 ("GPUs needed", f"{p['gpus_needed']:,}")]
    width = max([20] + [len(label) for label, value in rows if value])
    return "\n".join(f"  {label:<{width}} {value}" if value else label for label, value in rows)


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
    train.add_argument("--latent-compression", type=parse_compression, metavar="t,h,w",
                       help="latent encoder downsampling (default 1,1,1: patches of pixels)")
    number(train, "--epochs", "passes over the data (default 1)")
    number(train, "--mfu", "model FLOPs utilisation, a fraction (e.g. 0.4)")
    count(train, "--num-gpus", "GPUs training in parallel (default 1)", default=1)
    serve = parser.add_argument_group("serving (2·N·T per request)")
    count(serve, "--prompt-tokens", "input tokens per request")
    count(serve, "--answer-tokens", "generated tokens per request")
    count(serve, "--requests-per-day", "requests to serve per day")
    number(serve, "--hours-per-day", "hours a day the fleet serves (default 24)", default=24.0)
    number(serve, "--utilization", "fraction of the dense peak achieved (e.g. 0.3)")
    parser.add_argument("--gpu", help="H100, h100-sxm, A100, L4, ... or 'cpu' (measured here)")
    parser.add_argument("--dtype", default="bf16", help="compute dtype for the peak (default bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    """Print the plan; bad or missing inputs raise ValueError (one error line, exit 2)."""
    p = plan(args)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
