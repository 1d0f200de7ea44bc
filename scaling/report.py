"""The sweep's plan, the fits and the context measurements as text for the terminal, and the
fits as a markdown report with their provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaling.context import ContextReport, decode_mbu
from scaling.findings import AblationRow, Analysis, Approach1, Approach2, Approach3, Holdout, Interval
from scaling.plan import Plan
from scaling.record import Definition, RunRecord

LAW_FIELDS = ("E", "A", "B", "alpha", "beta", "a", "b")  # approach 3's parameters and exponents, as tabled


@dataclass
class Provenance:
    """Where a report's data came from and the commands that made it."""

    source: str  # the sweep directory or the CSV
    command: str  # the fit's
    plot: str | None = None  # the PNG of the fits, relative to the report where it can be
    sweep_command: str | None = None  # a sweep's: the command that ran it
    sweep_data: str | None = None  # and its data, in words
    code: str | None = None  # the commit the fit ran at


def format_plan(plan: Plan, sweep_dir: Path) -> str:
    """The plan as a table: each run's size, steps (and 6ND's), FLOPs, estimated time; the total."""
    from scaling.runs import state

    lines = [
        f"sweep {plan.sweep.name} -> {sweep_dir}",
        f"data: {plan.data_clips:,} clips of latent {'x'.join(map(str, plan.latent))} (each run sees each at most once), "
        f"global batch {plan.sweep.hparams.batch_size}, {plan.sweep.processes} process(es) per run",
        "",
        f"{'depth':>5} {'width':>5} {'N (law)':>10} {'per_sample':>10} {'FLOPs/step':>11} {'6N·D/step':>10} {'s/step':>7}",
    ]
    for size in plan.sizes.values():
        law = 6 * size.n * size.tokens_per_step
        timed = f"{size.s_per_step:7.3f}" if size.s_per_step is not None else f"{'-':>7}"
        lines.append(
            f"{size.depth:>5} {size.model.hidden_size:>5} {size.n:>10,} {size.params.get('per_sample', 0):>10,} "
            f"{size.measured_per_step:>11.3e} {law:>10.3e} {timed}"
        )
    lines += [
        "",
        f"{'run':<22} {'steps':>6} {'6ND steps':>9} {'warmup':>6} {'lr':>8} {'FLOPs':>10} {'vs budget':>9} {'est.':>7}  state",
    ]
    total = 0.0
    for run in plan.runs:
        est = plan.estimate_s(run)
        total += est or 0.0
        lines.append(
            f"{run.id:<22} {run.steps:>6} {run.law_steps:>9} {run.warmup_steps:>6} {run.lr:>8.2e} {run.flops:>10.3e} "
            f"{run.flops / run.budget - 1:>+9.2%} {'-' if est is None else f'{est:.0f} s':>7}  {state(sweep_dir, run)}"
        )
    todo = sum(plan.estimate_s(r) or 0 for r in plan.runs if state(sweep_dir, r) != "finished")
    timed = all(size.s_per_step is not None for size in plan.sizes.values())
    lines.append(
        f"\n{len(plan.runs)} runs, {sum(r.flops for r in plan.runs):.3e} FLOPs; "
        + (
            f"estimated {total / 60:.1f} min on this device ({todo / 60:.1f} min left to run)"
            if timed
            else "no time estimate (sizes not timed)"
        )
    )
    return "\n".join(lines)


def _interval(intervals: dict[str, Interval], key: str) -> str:
    lo_hi = intervals.get(key)
    return f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _approach3_text(a3: Approach3, holdout: Holdout | None) -> list[str]:
    """Approach 3's parameters and optimum with their intervals, and the leave-future-out check."""
    lines = [
        f"Approach 3, L(N, D) = E + A/N^alpha + B/D^beta (summed Huber, delta 1e-3, L-BFGS; "
        f"{'converged' if a3.converged else 'NOT converged: ' + a3.status}; "
        f"{a3.bootstrap} bootstrap refits, {a3.bootstrap_failed} failed; {a3.level:.0%} intervals):"
    ]
    iv = a3.intervals
    for key in LAW_FIELDS:
        lines.append(f"  {key:<6} {getattr(a3, key):.4g}{_interval(iv, key)}")
    lines += [
        f"  at C = {a3.at:.3e}: N_opt {a3.n_opt:.4g}{_interval(iv, 'n_opt')}, D_opt {a3.d_opt:.4g}{_interval(iv, 'd_opt')}, "
        f"{a3.tokens_per_param:.3g} tokens/param{_interval(iv, 'tokens_per_param')}, loss {a3.loss_opt:.4f}{_interval(iv, 'loss_opt')}"
        + (
            f" (a run's loss there: {_interval(iv, 'loss_pred').strip()}, prediction interval)"
            if "loss_pred" in iv
            else ""
        )
    ]
    if (h := holdout) is not None:
        lines.append(
            f"  leave-future-out: fitted on {h.runs_fitted} runs without C {h.budget:.3e}, it predicts the "
            f"optimal loss there {h.predicted_loss_opt:.4f} vs the best run's {h.best_measured:.4f} "
            f"({h.error:+.1%}); its runs' losses within {h.mean_abs_run_error:.1%} on average"
        )
    return lines


def format_analysis(result: Analysis) -> str:
    """The fits as text: approach 3 with intervals, approaches 2 and 1, the ablation, the LR check."""
    a2, a1, iv = result.approach2, result.approach1, result.approach2.intervals
    lines = [
        f"{result.runs} runs over {result.budgets} budgets; compute counted as {result.definition}",
        "",
        *_approach3_text(result.approach3, result.holdout),
    ]
    lines += [
        "",
        f"Approach 2 (isoFLOP parabolas): a = {_num(a2.a)}{_interval(iv, 'a')}, b = {_num(a2.b)}{_interval(iv, 'b')}"
        + (
            f"; at C = {a2.at:.3e}: N_opt {a2.n_opt:.4g}{_interval(iv, 'n_opt')}, "
            f"{a2.tokens_per_param:.3g} tokens/param{_interval(iv, 'tokens_per_param')}"
            if a2.at
            else ""
        )
        + (f" ({a2.bootstrap} residual-bootstrap refits, {a2.bootstrap_failed} failed)" if a2.bootstrap else ""),
    ]
    for p in a2.profiles:
        where = f"N_opt {p.n_opt:.4g}, loss {p.loss_opt:.4f}" if p.n_opt else "no minimum"
        lines.append(f"  C {p.budget:.3e}: {len(p.sizes)} sizes, {where}" + (f"  LEFT OUT: {p.flag}" if p.flag else ""))
    lines += ["", f"Approach 1 (lowest loss per budget): a = {_num(a1.a)}"]
    lines += [f"  C {b.budget:.3e}: {b.id} (N {b.n:.4g}, loss {b.loss:.4f})" for b in a1.best]
    lines += [
        "",
        "How the answer moves with the way compute is counted (N_C = C / 6D under each):",
        f"  {'compute':<16} {'a (A3)':>7} {'b (A3)':>7} {'tok/param (A3)':>14} {'a (A2)':>7} {'tok/param (A2)':>14} {'a (A1)':>7}",
    ]
    for name, row in result.ablation.items():
        t2 = row.approach2.tokens_per_param
        lines.append(
            f"  {name:<16} {row.approach3.a:>7.3f} {row.approach3.b:>7.3f} "
            f"{row.approach3.tokens_per_param:>14.3g} {_num(row.approach2.a):>7} "
            f"{'-' if t2 is None else f'{t2:.3g}':>14} {_num(row.approach1.a):>7}"
        )
    if (inf := result.inference) is not None:
        lines += [
            "",
            f"Inference-aware (Sardana & Frankle 2024): {inf.inference_tokens:.3g} generated tokens x "
            f"{inf.sampling_steps} sampling steps at loss {inf.loss:.4f}: N {inf.n:.4g} trained on "
            f"{inf.d:.4g} tokens ({inf.tokens_per_param:.3g} tokens/param), {inf.total_flops:.3e} FLOPs in all, "
            f"{inf.saving:.1%} less than the compute-optimal N {inf.compute_optimal_n:.4g}",
        ]
    for key, check in result.lr_check.items():
        tried = ", ".join(f"x{m:g}: {loss:.4f}" for m, loss in check.losses.items())
        warn = "  WARNING: best LR at the edge of those tried; the LR rule may be off here" if check.edge else ""
        lines.append(f"LR check {key}: {tried}; best x{check.best:g}{warn}")
    return "\n".join(lines)


def format_context(report: ContextReport) -> str:
    """`scaling context`'s table: per context, FLOPs per decoded token (measured by part, the
    formula, 2N), TTFT and TPOT; then the crossovers."""
    a = report.analysis
    lines = [
        f"decode of batch {a.batch}: FLOPs and time per generated token vs context "
        f"(law 2N = {a.law_flops_per_token:.4g}; weights {a.weight_bytes / 2**20:.1f} MiB, "
        f"K/V {a.kv_bytes_per_key / 1024:.1f} KiB per key)",
        "",
        f"{'context':>8} {'weights':>10} {'attention':>10} {'measured':>10} {'formula':>10} {'/ 2N':>6} "
        f"{'attn share':>10} {'TTFT s':>8} {'x bound':>7} {'TPOT ms':>8} {'min-max ms':>13} {'K/V MiB':>8}"
        + (f" {'MBU':>6}" if report.bandwidth else ""),
    ]
    peak = report.peak.flops if report.peak else None
    for p in report.points:
        measured, formula = sum(p.decode_flops.values()), sum(p.formula_flops.values())
        attention = p.attention_flops
        lo, hi = p.tpot_spread_s
        # TTFT over its bound: the prefill's measured FLOPs at the device's peak
        bound = f"{p.ttft_s / (p.prefill_flops / peak):>7.2f}" if peak else f"{'-':>7}"
        lines.append(
            f"{p.context:>8} {measured - attention:>10.4g} {attention:>10.4g} {measured:>10.4g} {formula:>10.4g} "
            f"{measured / p.law_flops:>6.2f} {attention / measured:>10.1%} {p.ttft_s:>8.2f} {bound} "
            f"{p.tpot_s * 1e3:>8.2f} {f'{lo * 1e3:.1f}-{hi * 1e3:.1f}':>13} {p.kv_bytes / 2**20:>8.1f}"
            + (f" {decode_mbu(p, a.weight_bytes, report.bandwidth.bytes_per_s):>6.1%}" if report.bandwidth else "")
        )
    fit, turn = a.tpot_fit, a.tpot_turn
    if peak:
        lines += [
            "",
            f"x bound: TTFT / (the prefill's measured FLOPs at {report.peak.source}, {peak / 1e9:.1f} GFLOP/s)",
        ]
    if report.bandwidth:
        lines.append(
            f"MBU: (weights + K/V bytes a step reads, modelled) / TPOT / {report.bandwidth.bytes_per_s / 1e9:.4g} GB/s "
            f"({report.bandwidth.source})"
        )
    lines += [
        "",
        f"measured FLOPs within {a.measured_vs_formula_max_gap:.2%} of the formula at every context",
        f"attention's FLOPs equal the weights' at context {a.attention_equals_weights_flops:,.0f}",
        f"one step's K/V bytes equal the weights' at context {a.kv_equals_weight_bytes:,.0f}",
    ]
    if fit is None:
        lines.append("TPOT turn: needs at least 3 contexts")
    else:
        where = (
            f"the context-proportional time equals the fixed time at context {turn:,.0f}"
            if turn is not None
            else "TPOT does not grow with the context over the contexts measured: no turn"
        )
        slope = fit.per_context_token_s * 1e6
        lines.append(
            f"TPOT = {fit.fixed_s * 1e3:.2f} ms {'+' if slope >= 0 else '-'} {abs(slope):.3f} µs x context: {where}"
        )
    return "\n".join(lines)


def _md_table(headers: list[str], rows: list[list[object]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


def _g(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _with_interval(value, intervals: dict[str, Interval], key: str, digits: int = 4) -> str:
    lo_hi = intervals.get(key)
    return f"{_g(value, digits)} [{_g(lo_hi[0], digits)}, {_g(lo_hi[1], digits)}]" if lo_hi else _g(value, digits)


def data_hash(results: list[RunRecord]) -> str:
    """sha256 (first 16 hex digits) of the fitted data: each run's id, N by convention, tokens,
    compute by definition and loss, in id order; the same runs give the same hash anywhere."""
    import hashlib
    import json

    rows = sorted(
        ({"id": r.id, "n": r.n, "tokens": r.tokens, "flops": r.flops, "loss": r.loss} for r in results),
        key=lambda r: str(r["id"]),
    )
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def _starts(starts: int | None) -> str:
    return (
        "all 4,500 points of Chinchilla's grid"
        if starts is None
        else f"the {starts} best of Chinchilla's 4,500-point grid"
    )


def _provenance_md(result: Analysis, results: list[RunRecord], provenance: Provenance) -> list[str]:
    """The report's title and where its numbers come from: the data, the commands, the estimators."""
    a3, a2 = result.approach3, result.approach2
    out = [
        f"# Scaling-law fit: {provenance.source}",
        "",
        "## Provenance",
        "",
        f"- data: `{provenance.source}`, {result.runs} runs at the rule's LR over {result.budgets} budgets; "
        f"data hash `{data_hash(results)}` (sha256 of each run's id, N, tokens, compute and loss)",
        f"- compute counted as **{result.definition}**; N_C = C / 6D under each definition",
        f"- command: `{provenance.command}`",
    ]
    if provenance.sweep_command:
        out.append(f"- sweep: `{provenance.sweep_command}`; {provenance.sweep_data}")
    if provenance.code:
        out.append(f"- code: {provenance.code}")
    out += [
        "- estimators: approach 3 as Besiroglu et al. 2024 refit Chinchilla (log-space LSE form, Huber δ = 1e-3 "
        f"summed, L-BFGS from {_starts(a3.starts)}; {a3.bootstrap} bootstrap refits resampling runs, "
        f"{a3.bootstrap_failed} failed; {a3.level:.0%} percentile intervals); approach 2: a parabola in log N per budget, "
        f"flagged budgets left out, {a2.bootstrap} residual-bootstrap refits ({a2.bootstrap_failed} "
        "failed); approach 1: the lowest loss per budget",
        "",
    ]
    return out


def _approach3_md(a3: Approach3, holdout: Holdout | None) -> list[str]:
    level = f"{a3.level:.0%}"
    out = [
        "## Approach 3: L(N, D) = E + A/N^α + B/D^β",
        "",
        f"Optimizer: {'converged' if a3.converged else 'NOT converged'} ({a3.status}), summed Huber {a3.objective:.4g}.",
        "",
    ]
    out += _md_table(
        ["parameter", f"value [{level} interval]"],
        [[k, _with_interval(getattr(a3, k), a3.intervals, k)] for k in LAW_FIELDS],
    )
    out += ["", f"At C = {a3.at:.3e} FLOPs:", ""]
    out += _md_table(
        ["quantity", f"value [{level} interval]"],
        [
            ["N_opt", _with_interval(a3.n_opt, a3.intervals, "n_opt")],
            ["D_opt (tokens)", _with_interval(a3.d_opt, a3.intervals, "d_opt")],
            ["tokens per parameter", _with_interval(a3.tokens_per_param, a3.intervals, "tokens_per_param", 3)],
            ["optimal loss", _with_interval(a3.loss_opt, a3.intervals, "loss_opt")],
            ["a run's loss there (prediction interval)", _with_interval(a3.loss_opt, a3.intervals, "loss_pred")],
        ],
    )
    if (h := holdout) is not None:
        out += [
            "",
            f"Leave-future-out: fitted on {h.runs_fitted} runs without C = {h.budget:.3e}, the law predicts "
            f"that budget's optimal loss {h.predicted_loss_opt:.4f} against the best run's {h.best_measured:.4f} "
            f"({h.error:+.1%}; its runs within {h.mean_abs_run_error:.1%} on average).",
        ]
    return out


def _approaches_12_md(a2: Approach2, a1: Approach1) -> list[str]:
    out = [
        "",
        "## Approach 2: isoFLOP profiles",
        "",
        f"a = {_with_interval(a2.a, a2.intervals, 'a', 3)}, b = {_with_interval(a2.b, a2.intervals, 'b', 3)}"
        + (
            f"; at C = {a2.at:.3e}: N_opt {_with_interval(a2.n_opt, a2.intervals, 'n_opt')}, "
            f"{_with_interval(a2.tokens_per_param, a2.intervals, 'tokens_per_param', 3)} tokens/param"
            if a2.at
            else ""
        ),
        "",
    ]
    out += _md_table(
        ["budget (FLOPs)", "sizes", "N_opt", "loss at N_opt", "used"],
        [[f"{p.budget:.3e}", len(p.sizes), _g(p.n_opt), _g(p.loss_opt), p.flag or "yes"] for p in a2.profiles],
    )
    out += ["", f"## Approach 1: lowest loss per budget (a = {_g(a1.a, 3)})", ""]
    out += _md_table(
        ["budget (FLOPs)", "run", "N", "loss"], [[f"{b.budget:.3e}", b.id, _g(b.n), _g(b.loss)] for b in a1.best]
    )
    return out


def _ablation_md(ablation: dict[Definition, AblationRow]) -> list[str]:
    out = ["", "## How the answer moves with the way compute is counted", ""]
    return out + _md_table(
        ["compute", "a (A3)", "b (A3)", "tokens/param (A3)", "α", "β", "E", "a (A2)", "tokens/param (A2)", "a (A1)"],
        [
            [
                name,
                _g(r.approach3.a, 3),
                _g(r.approach3.b, 3),
                _g(r.approach3.tokens_per_param, 3),
                _g(r.approach3.alpha, 3),
                _g(r.approach3.beta, 3),
                _g(r.approach3.E, 3),
                _g(r.approach2.a, 3),
                _g(r.approach2.tokens_per_param, 3),
                _g(r.approach1.a, 3),
            ]
            for name, r in ablation.items()
        ],
    )


def _checks_md(result: Analysis) -> list[str]:
    """The inference-aware optimum and the LR check, where there are any."""
    out = []
    if (inf := result.inference) is not None:
        out += [
            "",
            "## Inference-aware optimum (Sardana & Frankle 2024)",
            "",
            f"{inf.inference_tokens:.3g} generated tokens x {inf.sampling_steps} sampling steps, at loss {inf.loss:.4f}: "
            f"N {inf.n:.4g} on {inf.d:.4g} tokens ({inf.tokens_per_param:.3g} tokens/param), {inf.total_flops:.3e} FLOPs "
            f"in all, {inf.saving:.1%} less than the compute-optimal N {inf.compute_optimal_n:.4g}.",
        ]
    if result.lr_check:
        out += ["", "## LR check", ""]
        out += _md_table(
            ["run", "loss by LR multiplier", "best", "at the edge"],
            [
                [
                    k,
                    ", ".join(f"x{m:g}: {v:.4f}" for m, v in c.losses.items()),
                    f"x{c.best:g}",
                    "YES" if c.edge else "no",
                ]
                for k, c in result.lr_check.items()
            ],
        )
    return out


def _runs_md(results: list[RunRecord], definition: Definition) -> list[str]:
    runs = sorted((r for r in results if r.loss is not None), key=lambda r: (r.budget, r.depth or 0))
    out = ["", "## Runs", ""]
    return out + _md_table(
        ["run", "N (non-embedding)", "tokens", f"C ({definition})", "loss ± se", "epochs", "wall s"],
        [
            [
                r.id,
                _g(r.law_n),
                _g(r.tokens),
                f"{r.flops[definition]:.3e}",
                f"{r.loss:.4f}" + (f" ± {r.loss_se:.4f}" if r.loss_se else ""),
                _g(r.epochs, 3),
                _g(r.wall_s, 4),
            ]
            for r in runs
        ],
    )


def markdown_report(result: Analysis, results: list[RunRecord], provenance: Provenance) -> str:
    """Every number `scaling.analysis.analyze` gives, as markdown, with its provenance: the data
    (source, hash, runs), the compute definition, the estimators, the commands and the plots."""
    out = _provenance_md(result, results, provenance)
    out += _approach3_md(result.approach3, result.holdout)
    out += _approaches_12_md(result.approach2, result.approach1)
    out += _ablation_md(result.ablation)
    out += _checks_md(result)
    out += _runs_md(results, result.definition)
    if provenance.plot:
        out += ["", f"![fits]({provenance.plot})"]
    return "\n".join(out) + "\n"
