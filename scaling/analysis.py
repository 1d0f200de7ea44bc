"""The laws a set of runs gives, by all three Chinchilla approaches, under each way of counting compute.

`analyze(results)` takes run records (scaling.record: a sweep's, or a CSV's) and returns an
Analysis (scaling.findings):

- the primary definition's Approach 3 (E, A, B, α, β, a, b, N_opt, D_opt and tokens per
  parameter at the reference budget, each with a bootstrap interval; optimizer status; failed
  refits counted), its Approach 2 (isoFLOP parabolas, off-grid budgets flagged and left out) and
  Approach 1 (per budget, the run with the lowest loss: the lower envelope of final losses).
- `holdout`: the leave-future-out check: approach 3 without the largest budget predicts it.
- `inference` (given lifetime generated tokens): the size that minimises training + inference compute.
- `ablation`: all three approaches under every compute definition.
- `lr_check`: per depth, the held-out loss at each LR multiplier tried; a warning when the best
  one is at the edge of those tried (the LR rule may be off there).

Only runs at the rule's LR (lr_multiplier 1) enter the fits. A budget's compute under a
definition other than the one it was planned in is the geometric mean of its runs' (they
differ once counted another way).
"""

from __future__ import annotations

import math

import numpy as np

from scaling.findings import (
    AblationRow,
    Analysis,
    Approach1,
    Approach2,
    Approach3,
    EnvelopePoint,
    Holdout,
    InferenceOptimum,
    LrCheck,
)
from scaling.fit import fit_isoflop, fit_parametric
from scaling.record import Definition, RunRecord

STARTS = 100  # approach 3's L-BFGS starts: the best of Chinchilla's grid (scaling.fit.fit_parametric)
LEVEL = 0.8  # bootstrap interval level


def _power_law(c: list[float], n: list[float]) -> float | None:
    """Exponent of n ∝ c^a by least squares in log-log (None with fewer than 2 distinct c)."""
    if len(set(c)) < 2:
        return None
    return float(np.polyfit(np.log(c), np.log(n), 1)[0])


def _groups(runs: list[RunRecord]) -> dict[float, list[RunRecord]]:
    out: dict[float, list[RunRecord]] = {}
    for r in runs:
        out.setdefault(r.budget, []).append(r)
    return out


def _compute(group: list[RunRecord], definition: Definition) -> float:
    """A budget's compute under `definition`: the geometric mean of its runs'."""
    return math.exp(np.mean([math.log(r.flops[definition]) for r in group]))


def approach1(runs: list[RunRecord], definition: Definition) -> Approach1:
    """Per budget, the run with the lowest loss; N_opt ∝ C^a over budgets."""
    best = []
    for group in _groups(runs).values():
        r = min(group, key=lambda x: x.loss)
        best.append(EnvelopePoint(budget=_compute(group, definition), id=r.id, n=r.n_eff(definition), loss=r.loss))
    best.sort(key=lambda x: x.budget)
    a = _power_law([b.budget for b in best], [b.n for b in best])
    return Approach1(a=a, b=None if a is None else 1 - a, best=best)


def approach2(runs: list[RunRecord], definition: Definition, bootstrap: int = 0, seed: int = 0) -> Approach2:
    """IsoFLOP parabolas per budget; N_opt ∝ C^a over the budgets whose minimum is inside their
    grid; with `bootstrap`, residual-bootstrap intervals of a, b, and N_opt and tokens per
    parameter at the largest usable budget (scaling.fit.fit_isoflop)."""
    budget_of = {key: _compute(g, definition) for key, g in _groups(runs).items()}
    iso = fit_isoflop(
        [budget_of[r.budget] for r in runs],
        [r.n_eff(definition) for r in runs],
        [r.loss for r in runs],
        bootstrap=bootstrap,
        level=LEVEL,
        seed=seed,
    )
    out = Approach2(
        a=iso.a,
        b=None if iso.a is None else 1 - iso.a,
        k=iso.k,
        profiles=iso.profiles,
        intervals={},
        level=LEVEL,
        bootstrap=iso.bootstrap,
        bootstrap_failed=iso.bootstrap_failed,
    )
    used = [p for p in iso.profiles if not p.flag]
    if used:
        top = max(used, key=lambda p: p.budget)
        out.n_opt, out.tokens_per_param, out.at = top.n_opt, top.budget / (6 * top.n_opt**2), top.budget
    if iso.intervals:
        (a_lo, a_hi), (n_lo, n_hi) = iso.intervals["a"], iso.intervals["n_opt"]
        out.intervals = {
            "a": (a_lo, a_hi),
            "b": (1 - a_hi, 1 - a_lo),
            "n_opt": (n_lo, n_hi),
            "tokens_per_param": (out.at / (6 * n_hi**2), out.at / (6 * n_lo**2)),
        }
    return out


def approach3(
    runs: list[RunRecord], definition: Definition, at: float, bootstrap: int, seed: int = 0, starts: int | None = STARTS
) -> Approach3:
    """The parametric law on (N_C, D, loss), Epoch's recipe, with bootstrap intervals; L-BFGS
    from the `starts` best points of Chinchilla's grid (None: all 4,500)."""
    fit = fit_parametric(
        [r.n_eff(definition) for r in runs],
        [r.tokens for r in runs],
        [r.loss for r in runs],
        bootstrap=bootstrap,
        seed=seed,
        level=LEVEL,
        at=at,
        starts=starts,
    )
    return Approach3.of(fit, LEVEL, starts)


def holdout(
    runs: list[RunRecord], definition: Definition, seed: int = 0, starts: int | None = STARTS
) -> Holdout | None:
    """Leave the largest budget out, fit approach 3 on the rest, predict the held-out budget: its
    compute-optimal loss (against the best run measured there) and each of its runs' loss.
    None when fewer than 5 runs or 2 budgets remain."""
    groups = _groups(runs)
    if len(groups) < 3:
        return None
    top = max(groups)
    rest = [r for r in runs if r.budget != top]
    if len(rest) < 5:
        return None
    held = groups[top]
    c = _compute(held, definition)
    fit = fit_parametric(
        [r.n_eff(definition) for r in rest],
        [r.tokens for r in rest],
        [r.loss for r in rest],
        seed=seed,
        at=c,
        starts=starts,
    )
    best = min(held, key=lambda r: r.loss)
    errors = [float(fit.loss(r.n_eff(definition), r.tokens) / r.loss - 1) for r in held]
    predicted = fit.values()["loss_opt"]
    return Holdout(
        budget=c,
        runs_fitted=len(rest),
        predicted_loss_opt=predicted,
        best_measured=best.loss,
        best_id=best.id,
        error=predicted / best.loss - 1,
        run_errors={r.id: e for r, e in zip(held, errors)},
        mean_abs_run_error=float(np.mean(np.abs(errors))),
    )


def inference_optimum(a3: Approach3, at: float, tokens: float, sampling_steps: int) -> InferenceOptimum:
    """Sardana & Frankle 2024: the N that reaches the compute-optimal loss of budget `at` with the
    least training plus lifetime inference compute, for `tokens` generated tokens (video patches)
    each costing `sampling_steps` forward passes of 2·N_C FLOPs (N_C = training FLOPs per token / 6,
    the measured count under the measured definition; a forward is a third of forward + backward).

    Minimises 6·N·D(N) + 2·N·S·T over N on a log grid, D(N) solving L(N, D) = L*(at)."""
    law = a3.law()
    n_opt, d_opt = law.optimum(at)
    target = float(law.loss(n_opt, d_opt))
    infer = 2 * sampling_steps * tokens
    chinchilla = 6 * n_opt * d_opt + infer * n_opt
    best_n, best_d, best_total = n_opt, d_opt, chinchilla
    for n in n_opt * np.geomspace(0.01, 100, 2001):
        room = target - law.E - law.A / n**law.alpha
        if room <= 0:
            continue
        d = (law.B / room) ** (1 / law.beta)
        total = 6 * n * d + infer * n
        if total < best_total:
            best_n, best_d, best_total = float(n), float(d), float(total)
    return InferenceOptimum(
        loss=target,
        inference_tokens=tokens,
        sampling_steps=sampling_steps,
        n=best_n,
        d=best_d,
        tokens_per_param=best_d / best_n,
        total_flops=best_total,
        compute_optimal_n=n_opt,
        compute_optimal_total_flops=chinchilla,
        saving=1 - best_total / chinchilla,
    )


def lr_check(results: list[RunRecord]) -> dict[str, LrCheck]:
    """Per (budget, depth) with LR-check runs: loss by multiplier, best, and whether it is at an edge."""
    out = {}
    checked = {(r.budget, r.depth) for r in results if r.lr_multiplier != 1}
    for budget, depth in sorted(checked):
        tried = {r.lr_multiplier: r.loss for r in results if r.budget == budget and r.depth == depth}
        best = min(tried, key=tried.get)
        edge = len(tried) > 1 and best in (min(tried), max(tried))
        out[f"C{budget:.3g}-d{depth}"] = LrCheck(losses=dict(sorted(tried.items())), best=best, edge=edge)
    return out


def analyze(
    results: list[RunRecord],
    primary: Definition | None = None,
    bootstrap: int = 1000,
    at: float | None = None,
    seed: int = 0,
    inference_tokens: float = 0.0,
    sampling_steps: int = 50,
    starts: int | None = STARTS,
) -> Analysis:
    """Approaches 1-3 under the primary definition (default: measured, or the CSV's "given"),
    and the compute-definition ablation. `at`: the budget (FLOPs) at which N_opt, D_opt and
    tokens per parameter are given (default: the largest budget); `starts`: approach 3's L-BFGS
    starts (None: all of Chinchilla's grid). Raises ValueError with fewer
    than 5 runs at the rule's LR."""
    runs = [r for r in results if r.lr_multiplier == 1 and r.loss is not None]
    if len(runs) < 5:
        raise ValueError(f"{len(runs)} finished runs: the parametric fit needs at least 5")
    definitions = [d for d in runs[0].flops if all(d in r.flops for r in runs)]
    primary = primary or ("measured" if "measured" in definitions else definitions[0])
    if primary not in definitions:
        raise ValueError(f"compute definition {primary!r} is not in the runs (have: {', '.join(definitions)})")

    def at_for(definition: Definition) -> float:
        return at or max(r.flops[definition] for r in runs)

    a3 = approach3(runs, primary, at_for(primary), bootstrap, seed, starts)
    out = Analysis(
        definition=primary,
        runs=len(runs),
        budgets=len(_groups(runs)),
        at=at_for(primary),
        approach3=a3,
        approach2=approach2(runs, primary, bootstrap, seed),
        approach1=approach1(runs, primary),
        holdout=holdout(runs, primary, seed, starts),
        ablation={},
        lr_check=lr_check(results),
    )
    if inference_tokens:
        out.inference = inference_optimum(a3, out.at, inference_tokens, sampling_steps)
    for definition in definitions:
        out.ablation[definition] = AblationRow(
            approach3=a3 if definition == primary else approach3(runs, definition, at_for(definition), 0, seed, starts),
            approach2=approach2(runs, definition),
            approach1=approach1(runs, definition),
        )
    return out
