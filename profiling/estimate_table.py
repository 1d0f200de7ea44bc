"""The `flops estimate` table: one aligned row per figure the plan computed, units spelled out,
then each figure it could not compute with the flags that would give it (profiling.estimate
makes the plan; this module only prints it)."""

from __future__ import annotations

# each figure (its --json key) -> its name in the text and in errors
LABELS = {
    "tokens": "tokens",
    "train_flops": "training FLOPs",
    "train_flops_with_attention": "training FLOPs with attention",
    "gpu_days": "GPU-days",
    "wall_days": "wall-clock days",
    "flops_per_request": "FLOPs per request",
    "seconds_per_request": "seconds per request",
    "gpus_needed": "GPUs needed",
}


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
        rows += [
            ("attention", f"{total - law:.3e} FLOPs{per}: {attention}"),
            (
                f"compute ({law_label} + attention)",
                f"{total:.3e} FLOPs{per} ({(total - law) / total:.1%} attention), used below",
            ),
        ]
    return rows


def _accelerator(p: dict, fraction: str, label: str) -> list[tuple[str, str]]:
    """The GPU row (with the MFU or utilization where used) and the dtype note, if a GPU is given."""
    if "gpu" not in p:
        return []
    used = f", {label} {p[fraction] * 100:.4g}%" if fraction in p else ""
    rows = [("accelerator", f"{p['gpu']} {p['dtype']}, {p['peak_flops'] / 1e12:.4g} TFLOP/s dense peak{used}")]
    return rows + ([("dtype", p["dtype_note"])] if "dtype_note" in p else [])


def format_plan(p: dict) -> str:
    """The human table: one aligned row per figure computed, units spelled out, then each figure
    not computed with the flags that would give it."""
    arch = f"{p.get('layers')} layers x d_attn {p.get('d_attn')}"
    rows: list[tuple[str, str]] = []
    if "tokens" in p:
        rows.append(("TRAINING", ""))
        for kind in ("image", "video"):
            if f"tokens_per_{kind}" in p:
                frames = f", {p['frames']} frames" if kind == "video" else ""
                rows.append(
                    (
                        f"tokens per {kind}",
                        f"{p[f'tokens_per_{kind}']:,} ({p['resolution']}{frames}, "
                        f"patch {_ints(p['patch'])}, latent compression {_ints(p['latent_compression'])}) "
                        f"x {_count(p[kind + 's'])} {kind}s",
                    )
                )
        epochs = f" ({_num(p['epochs'])} epochs)" if p["epochs"] != 1 else ""
        rows += [("parameters", _count(p["params"]))] if "train_flops" in p else []
        rows.append(("tokens", _count(p["tokens"]) + epochs))
        if "train_flops" in p:
            rows += _with_attention(
                "6ND",
                p["train_flops"],
                p.get("train_flops_with_attention"),
                "",
                f"12 x {arch} x S per token (PaLM, bidirectional), S = "
                + (f"{p['seq_len']:,}" if "seq_len" in p else "tokens per sample"),
            )
        rows += _accelerator(p, "mfu", "MFU")
        if "gpu_days" in p:
            rows.append(("GPU time", f"{_num(p['gpu_days'])} GPU-days ({p['gpu_seconds']:.3e} GPU-seconds)"))
        if "wall_days" in p:
            rows.append(
                (
                    "wall clock",
                    f"{_num(p['wall_days'])} days on {_count(p['num_gpus'])} GPU{'s' if p['num_gpus'] != 1 else ''}",
                )
            )
    if "flops_per_request" in p:
        rows += [
            ("SERVING", ""),
            ("parameters", _count(p["params"])),
            ("tokens per request", f"{_count(p['prompt_tokens'])} prompt + {_count(p['answer_tokens'])} answer"),
            *_with_attention(
                "2NT",
                p["flops_per_request"],
                p.get("flops_per_request_with_attention"),
                " per request",
                f"4 x {arch} x {p.get('attention_pairs_per_request', 0):,} causal (query, key) pairs",
            ),
            *_accelerator(p, "utilization", "utilization"),
        ]
        if "seconds_per_request" in p:
            rows.append(
                (
                    "time per request",
                    f"{_num(p['seconds_per_request'])} s on one GPU "
                    f"({_num(p['requests_per_second_per_gpu'])} requests/s per GPU)",
                )
            )
        if "gpus_needed" in p:
            rows += [
                ("load", f"{_count(p['requests_per_day'])} requests/day over {_num(p['hours_per_day'])} h/day"),
                ("GPUs needed", f"{p['gpus_needed']:,}"),
            ]
    if p["missing"]:
        rows.append(("NOT COMPUTED", ""))
        rows += [(LABELS[f], "add " + ", ".join(flags)) for f, flags in p["missing"].items()]
    width = max([20] + [len(label) for label, value in rows if value])
    return "\n".join(f"  {label:<{width}} {value}" if value else label for label, value in rows)
