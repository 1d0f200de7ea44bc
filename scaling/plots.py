"""The fits as one PNG of four panels: loss vs compute per size with the fitted frontier; the
isoFLOP profiles with their parabolas; N_opt vs C from each approach (approach 3 with its
bootstrap interval); approach 3's residuals in log loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from scaling.context import ContextReport
from scaling.findings import Analysis
from scaling.record import Definition, RunRecord


def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display here or on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _size_key(run: RunRecord, n: float) -> float:
    """The curve a run is drawn on: its depth (a sweep's), else its log10 N to one decimal (a CSV's)."""
    return run.depth if run.depth is not None else round(math.log10(n), 1)


def plot_fits(results: list[RunRecord], analysis: Analysis, path: str | Path) -> Path:
    """Write the four panels for `analysis` (scaling.analysis.analyze of `results`) to `path`."""
    plt = _pyplot()
    runs = _FittedRuns([r for r in results if r.lr_multiplier == 1], analysis.definition)
    fig, ((ax_c, ax_iso), (ax_opt, ax_res)) = plt.subplots(2, 2, figsize=(12, 9))
    cs = np.geomspace(min(runs.c.values()) / 1.5, max(runs.c.values()) * 1.5, 50)
    _compute_panel(ax_c, runs, analysis, cs, plt.get_cmap("viridis"))
    _isoflop_panel(ax_iso, runs, analysis, plt.get_cmap("viridis"))
    _optimum_panel(ax_opt, analysis, cs)
    law = analysis.approach3.law()
    residuals = [math.log(law.loss(runs.n[id(r)], r.tokens)) - math.log(r.loss) for r in runs.runs]
    ax_res.scatter(
        [runs.c[id(r)] for r in runs.runs], residuals, c=[math.log(runs.n[id(r)]) for r in runs.runs], cmap="viridis"
    )
    ax_res.axhline(0, color="black", lw=1)
    ax_res.set(xscale="log", xlabel="C (FLOPs)", ylabel="log predicted - log measured", title="approach 3 residuals")
    return _save(fig, path)


class _FittedRuns:
    """The runs the laws were fitted on, with each one's N and compute under the fit's definition."""

    def __init__(self, runs: list[RunRecord], definition: Definition) -> None:
        self.runs = runs
        self.n = {id(r): r.n_eff(definition) for r in runs}
        self.c = {id(r): r.flops[definition] for r in runs}


def _compute_panel(ax, runs: _FittedRuns, analysis: Analysis, cs: np.ndarray, cmap) -> None:
    """Loss against compute, one line per size, and approach 3's frontier."""
    sizes = sorted({_size_key(r, runs.n[id(r)]) for r in runs.runs})
    for i, size in enumerate(sizes):
        mine = sorted((r for r in runs.runs if _size_key(r, runs.n[id(r)]) == size), key=lambda r: runs.c[id(r)])
        ax.plot(
            [runs.c[id(r)] for r in mine],
            [r.loss for r in mine],
            "o-",
            color=cmap(i / max(1, len(sizes) - 1)),
            label=f"depth {size}" if mine[0].depth is not None else f"log10 N {size}",
        )
    law = analysis.approach3.law()
    ax.plot(cs, [law.loss(*law.optimum(c)) for c in cs], "k--", label="approach 3 frontier")
    ax.set(
        xscale="log",
        xlabel=f"training compute C ({analysis.definition}, FLOPs)",
        ylabel="held-out loss",
        title="loss vs compute per size",
    )
    ax.legend(fontsize=7)


def _isoflop_panel(ax, runs: _FittedRuns, analysis: Analysis, cmap) -> None:
    """Loss against N per budget, each budget's parabola, and approach 2's vertices (x: left out)."""
    budgets = sorted({r.budget for r in runs.runs})
    for i, budget in enumerate(budgets):
        mine = sorted((r for r in runs.runs if r.budget == budget), key=lambda r: runs.n[id(r)])
        colour = cmap(i / max(1, len(budgets) - 1))
        ax.errorbar(
            [runs.n[id(r)] for r in mine],
            [r.loss for r in mine],
            yerr=[r.loss_se or 0 for r in mine],
            fmt="o",
            color=colour,
            label=f"C {budget:.2g}",
        )
        if len(mine) >= 3:
            x = np.log([runs.n[id(r)] for r in mine])
            curve = np.polyfit(x, [r.loss for r in mine], 2)
            xs = np.linspace(x.min(), x.max(), 40)
            ax.plot(np.exp(xs), np.polyval(curve, xs), "-", color=colour, lw=1)
    for p in analysis.approach2.profiles:
        if p.n_opt:
            ax.plot(p.n_opt, p.loss_opt, "x" if p.flag else "*", color="red", ms=10)
    ax.set(xscale="log", xlabel="N (C / 6D)", ylabel="held-out loss", title="isoFLOP profiles (x: left out)")
    ax.legend(fontsize=7)


def _optimum_panel(ax, analysis: Analysis, cs: np.ndarray) -> None:
    """The compute-optimal N by each approach, approach 3's with its interval."""
    a3, a2, a1 = analysis.approach3, analysis.approach2, analysis.approach1
    law = a3.law()
    ax.plot(cs, [law.optimum(c)[0] for c in cs], "k-", label=f"approach 3: a = {a3.a:.2f}")
    if "n_opt" in a3.intervals:
        lo, hi = a3.intervals["n_opt"]
        ax.errorbar([a3.at], [a3.n_opt], yerr=[[a3.n_opt - lo], [hi - a3.n_opt]], fmt="ks", capsize=4)
    used = [p for p in a2.profiles if p.n_opt and not p.flag]
    ax.plot(
        [p.budget for p in used],
        [p.n_opt for p in used],
        "r*",
        ms=10,
        label=f"approach 2: a = {a2.a:.2f}" if a2.a is not None else "approach 2",
    )
    ax.plot(
        [b.budget for b in a1.best],
        [b.n for b in a1.best],
        "bo",
        label=f"approach 1: a = {a1.a:.2f}" if a1.a is not None else "approach 1",
    )
    ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel="N_opt", title="compute-optimal size")
    ax.legend(fontsize=8)


def plot_context(report: ContextReport, path: str | Path) -> Path:
    """Two panels of `scaling context`'s report: FLOPs per decoded token vs context (measured by
    part, the formula, 2N, the attention = weights crossover) and TPOT vs context (measured, its
    straight-line fit, the turn)."""
    plt = _pyplot()
    points, a = report.points, report.analysis
    ctx = np.array([p.context for p in points])
    attention = np.array([p.attention_flops for p in points])
    total = np.array([sum(p.decode_flops.values()) for p in points])
    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_f.plot(ctx, total, "ko-", label="measured, total")
    ax_f.plot(ctx, total - attention, "s-", label="measured, weights (dense + lm-head)")
    ax_f.plot(ctx, attention, "^-", label="measured, attention")
    ax_f.plot(ctx, [sum(p.formula_flops.values()) for p in points], "k:", label="formula")
    ax_f.axhline(a.law_flops_per_token, color="red", ls="--", label="law: 2N")
    if (x := a.attention_equals_weights_flops) is not None:
        ax_f.axvline(x, color="grey", lw=1)
        ax_f.text(x, 0.5, f" attention = weights\n at {x:,.0f}", transform=ax_f.get_xaxis_transform(), fontsize=8)
    ax_f.set(
        xscale="log", yscale="log", xlabel="context (tokens)", ylabel="FLOPs per generated token", title="decode FLOPs"
    )
    ax_f.set_xticks(ctx, [f"{c:,}" for c in ctx], fontsize=7)
    ax_f.xaxis.set_minor_formatter("")
    ax_f.legend(fontsize=7)
    ax_t.plot(ctx, [p.tpot_s * 1e3 for p in points], "ko-", label="measured TPOT (median)")
    ax_t.fill_between(
        ctx,
        [p.tpot_spread_s[0] * 1e3 for p in points],
        [p.tpot_spread_s[1] * 1e3 for p in points],
        color="grey",
        alpha=0.3,
        label="fastest-slowest step",
    )
    if (fit := a.tpot_fit) is not None:
        xs = np.linspace(0, ctx.max(), 50)
        ax_t.plot(xs, (fit.fixed_s + fit.per_context_token_s * xs) * 1e3, "b--", label="least-squares line")
    if (turn := a.tpot_turn) is not None:
        ax_t.axvline(turn, color="blue", lw=1, label=f"K/V time = fixed time at {turn:,.0f}")
    ax_t.axvline(
        a.kv_equals_weight_bytes,
        color="grey",
        lw=1,
        ls=":",
        label=f"K/V bytes = weight bytes at {a.kv_equals_weight_bytes:,.0f}",
    )
    ax_t.set(xlabel="context (tokens)", ylabel="ms per generated token", title=f"decode time, batch {a.batch}")
    ax_t.legend(fontsize=7)
    return _save(fig, path)
