"""Fitting scaling laws to (parameters N, tokens D, loss L) runs: Chinchilla's approaches 2 and 3.

Approach 3 (Hoffmann et al. 2022, arXiv 2203.15556, eq. 2 and appendix D.2), as refit by
Besiroglu et al. 2024 (arXiv 2404.10102): L(N, D) = E + A/N^α + B/D^β, fitted in log space as
log L ≈ LSE(a − α·log N, b − β·log D, e) with A = e^a, B = e^b, E = e^e, minimising the Huber
loss (δ = 1e-3) of the residuals **summed** over runs (the original averaged it, so L-BFGS
stopped early), by L-BFGS from the best points of Chinchilla's grid of starts (or all of
them), the best result kept. Intervals come
from nonparametric bootstrap refits (resampling runs with replacement), started from the fit.
Under C ∝ N·D the compute-optimal allocation is N_opt ∝ C^a, D_opt ∝ C^b with
a = β/(α+β), b = α/(α+β).

Approach 2 (isoFLOP profiles): for each compute budget, loss against log N is fitted with a
parabola whose minimum gives N_opt(C); then log N_opt = a·log C + const by least squares. A
budget whose minimum falls outside its sampled sizes, or at the first or last of them, is
flagged and left out (Approach 2 is biased when the grid is not centred on the optimum).

Fitting is scipy's (L-BFGS-B, least squares); this module holds the model and the recipe.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

# Chinchilla's grid of starting points (appendix D.2): 5 x 5 x 5 x 6 x 6 = 4,500 starts.
CHINCHILLA_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
HUBER_DELTA = 1e-3
# The summed Huber loss of log residuals is ~1e-4 per run and its gradient far smaller: scipy's
# default tolerances (gtol 1e-5) stop L-BFGS at its start, the early stop Epoch found in Chinchilla's fit.
LBFGS_OPTIONS = {"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000}


@dataclass
class ParametricFit:
    """L(N, D) = E + A/N^alpha + B/D^beta, with the compute-optimal exponents it implies."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss of the log residuals at the optimum
    runs: int
    converged: bool = True  # L-BFGS-B's own success flag at the best start
    status: str = ""  # its message
    at: float | None = None  # the budget (FLOPs) N_opt, D_opt and tokens per parameter are given at
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (low, high), bootstrap
    bootstrap: int = 0  # refits asked for
    bootstrap_failed: int = 0  # refits that did not converge or gave non-finite values (left out of the intervals)

    @property
    def a(self) -> float:
        """N_opt ∝ C^a under C ∝ N·D: β/(α+β)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b under C ∝ N·D: α/(α+β)."""
        return self.alpha / (self.alpha + self.beta)

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        """Predicted loss at N parameters and D tokens (any broadcastable shapes)."""
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the law at C = 6·N·D = `flops` (Hoffmann et al. 2022, eq. 4):
        N_opt = G·(C/6)^a, D_opt = (C/6)^b / G, G = (αA / (βB))^(1/(α+β)). NaN unless α, β > 0."""
        if not (self.alpha > 0 and self.beta > 0):
            return float("nan"), float("nan")
        with np.errstate(all="ignore"):  # a degenerate bootstrap refit (A or B overflowed): NaN, counted as failed
            g = np.float64(self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
            if not (np.isfinite(g) and g > 0):
                return float("nan"), float("nan")
            return float(g * (flops / 6) ** self.a), float((flops / 6) ** self.b / g)

    def values(self) -> dict[str, float]:
        """The fitted parameters, a and b, and (when `at` is set) N_opt, D_opt, tokens per parameter
        and the predicted loss of that compute-optimal run."""
        out = {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta, "a": self.a, "b": self.b}
        if self.at:
            n_opt, d_opt = self.optimum(self.at)
            out |= {
                "n_opt": n_opt,
                "d_opt": d_opt,
                "tokens_per_param": d_opt / n_opt,
                "loss_opt": float(self.loss(n_opt, d_opt)),
            }
        return out


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log L − LSE(a − α log N, b − β log D, e), and its gradient in
    theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    pred = logsumexp(terms, axis=0)
    r = pred - log_l
    value = huber(HUBER_DELTA, r).sum()
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    w = np.exp(terms - pred)  # softmax weights: d pred / d (each term)
    grad = np.array(
        [
            (dr * w[0]).sum(),
            (dr * w[1]).sum(),
            (dr * w[2]).sum(),
            -(dr * w[0] * log_n).sum(),
            -(dr * w[1] * log_d).sum(),
        ]
    )
    return value, grad


def _minimize(start: np.ndarray, data: tuple[np.ndarray, ...]):
    return minimize(_objective, start, args=data, jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS)


def fit_parametric(
    n,
    d,
    loss,
    grid: dict | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    level: float = 0.8,
    at: float | None = None,
    starts: int | None = 100,
) -> ParametricFit:
    """Approach 3 on runs of `n` parameters, `d` tokens and final `loss` (equal-length 1-D arrays,
    at least 5 runs: five parameters are fitted).

    `grid`: starting points per parameter (default CHINCHILLA_GRID; a coarser one is faster).
    `starts`: L-BFGS runs from this many grid points, those where the objective is lowest
    (None: from every point, as Chinchilla and Epoch did; 4,500 runs take about a minute).
    `bootstrap`: number of resampled refits for `level` (default 80 %) percentile intervals of
    every parameter and of a, b (refits that fail are counted in `bootstrap_failed`). `at`: a
    budget in FLOPs at which to give N_opt, D_opt, tokens per parameter and the optimal loss
    (with intervals), and `loss_pred`: the prediction interval of one run's loss there (each
    refit's optimal loss times a resampled residual of this fit).
    Raises ValueError on too few runs or non-positive values.
    """
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError("n, d and loss must be 1-D arrays of one length")
    if len(n) < 5:
        raise ValueError(f"a parametric fit has 5 parameters: it needs at least 5 runs, got {len(n)}")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(loss > 0) and np.all(np.isfinite([n, d, loss]))):
        raise ValueError("n, d and loss must all be positive and finite")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = grid or CHINCHILLA_GRID
    points = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), float)
    if starts is not None and starts < len(points):
        values = np.array([_objective(p, log_n, log_d, log_l)[0] for p in points])
        points = points[np.argsort(values, kind="stable")[:starts]]
    best = min((_minimize(p, (log_n, log_d, log_l)) for p in points), key=lambda r: r.fun)
    fit = _to_fit(best, len(log_n), at)
    if bootstrap:
        rng = np.random.default_rng(seed)
        residuals = log_l - np.log(fit.loss(n, d))  # a run's scatter about the law, in log loss
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(log_n), len(log_n))
            refit = _minimize(best.x, (log_n[idx], log_d[idx], log_l[idx]))
            values = _to_fit(refit, len(idx), at).values()
            if at:  # prediction: the refit's optimal loss and one run's scatter about it
                values["loss_pred"] = values["loss_opt"] * float(np.exp(rng.choice(residuals)))
            if refit.success and all(np.isfinite(v) for v in values.values()):
                samples.append(values)
        fit.bootstrap, fit.bootstrap_failed = bootstrap, bootstrap - len(samples)
        fit.intervals = _percentiles(samples, level)
    return fit


def _percentiles(samples: list[dict[str, float]], level: float) -> dict[str, tuple[float, float]]:
    """Central `level` percentile interval of each key over the bootstrap samples."""
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        k: (float(np.percentile([s[k] for s in samples], lo)), float(np.percentile([s[k] for s in samples], hi)))
        for k in (samples[0] if samples else {})
    }


def _to_fit(result, runs: int, at: float | None = None) -> ParametricFit:
    a, b, e, alpha, beta = result.x
    with np.errstate(over="ignore"):  # inf from a refit that ran away: the caller drops non-finite values
        E, A, B = np.exp([e, a, b])
    return ParametricFit(
        E=float(E),
        A=float(A),
        B=float(B),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(result.fun),
        runs=runs,
        converged=bool(result.success),
        status=str(result.message),
        at=at,
    )


@dataclass
class IsoFlopProfile:
    """One budget's parabola in log N: its minimum and whether it can be trusted."""

    budget: float  # FLOPs
    sizes: list[float]  # N of the runs at this budget
    n_opt: float | None  # argmin of the parabola (None when it opens downward)
    loss_opt: float | None
    flag: str = ""  # why the budget is left out ("" when it is used)


@dataclass
class IsoFlopFit:
    """Approach 2: N_opt(C) = k·C^a over the budgets whose minimum lies inside their grid."""

    profiles: list[IsoFlopProfile]
    a: float | None  # exponent of N_opt ∝ C^a; None with fewer than 2 usable budgets
    k: float | None
    # residual-bootstrap intervals of a and of N_opt at the largest usable budget ("n_opt")
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: int = 0
    bootstrap_failed: int = 0  # refits with fewer than 2 usable budgets, or without the largest

    def n_opt(self, budget: float) -> float:
        """Compute-optimal N at `budget` FLOPs from the fitted power law."""
        if self.a is None:
            raise ValueError("fewer than 2 budgets had an interior minimum: no power law was fitted")
        return self.k * budget**self.a


def _profiles(budgets: np.ndarray, n: np.ndarray, loss: np.ndarray) -> list[IsoFlopProfile]:
    profiles = []
    for c in sorted(set(budgets.tolist())):
        at = budgets == c
        sizes, losses = n[at], loss[at]
        order = np.argsort(sizes)
        sizes, losses = sizes[order], losses[order]
        if len(sizes) < 3:
            profiles.append(IsoFlopProfile(c, sizes.tolist(), None, None, f"{len(sizes)} sizes: a parabola needs 3"))
            continue
        curve = np.polyfit(np.log(sizes), losses, 2)
        if curve[0] <= 0:
            profiles.append(IsoFlopProfile(c, sizes.tolist(), None, None, "loss vs log N is not convex here"))
            continue
        x_opt = -curve[1] / (2 * curve[0])
        with np.errstate(over="ignore"):  # a nearly flat parabola's minimum far off the grid: flagged below
            n_opt, loss_opt = float(np.exp(x_opt)), float(np.polyval(curve, x_opt))
        flag = ""
        if not sizes[0] < n_opt < sizes[-1]:
            flag = "minimum outside the sizes tried: extend the grid"
        elif np.argmin(losses) in (0, len(losses) - 1):  # the best run measured is the smallest or largest
            flag = "minimum at the edge of the sizes tried: centre the grid on it"
        profiles.append(IsoFlopProfile(c, sizes.tolist(), n_opt, loss_opt, flag))
    return profiles


def _power_law(profiles: list[IsoFlopProfile]) -> tuple[float, float] | None:
    """(a, k) of N_opt = k·C^a over the unflagged budgets; None with fewer than 2."""
    used = [p for p in profiles if not p.flag]
    if len(used) < 2:
        return None
    slope, intercept = np.polyfit(np.log([p.budget for p in used]), np.log([p.n_opt for p in used]), 1)
    return float(slope), float(np.exp(intercept))


def fit_isoflop(budgets, n, loss, bootstrap: int = 0, level: float = 0.8, seed: int = 0) -> IsoFlopFit:
    """Approach 2 on runs of compute `budgets` (FLOPs; runs of one budget share the same value),
    `n` parameters and final `loss`. A budget needs 3 or more sizes for its parabola; its minimum
    must fall strictly inside its sizes, and its best measured run must not be the smallest or
    the largest, for it to be used.

    `bootstrap` refits give `level` intervals of a and of N_opt at the largest usable budget. The
    sizes are a design, not a sample, so it is a residual bootstrap: every budget's parabola
    residuals are pooled (inflated by sqrt(n / (n - 3·budgets)) for the fitted coefficients),
    resampled onto the fitted losses, and the whole approach (parabolas, flags, power law)
    is refit; a refit that loses the power law or the largest budget is counted as failed."""
    budgets, n, loss = (np.asarray(x, float) for x in (budgets, n, loss))
    profiles = _profiles(budgets, n, loss)
    law = _power_law(profiles)
    if law is None:
        return IsoFlopFit(profiles, None, None)
    fit = IsoFlopFit(profiles, *law)
    fitted = np.array(loss)
    for c in {p.budget for p in profiles if p.n_opt is not None}:
        at = budgets == c
        fitted[at] = np.polyval(np.polyfit(np.log(n[at]), loss[at], 2), np.log(n[at]))
    parabolas = sum(p.n_opt is not None for p in profiles)
    dof = len(loss) - 3 * parabolas
    if bootstrap and dof > 0:
        top = max(p.budget for p in profiles if not p.flag)
        pooled = (loss - fitted)[np.isin(budgets, [p.budget for p in profiles if p.n_opt is not None])]
        pooled = pooled * np.sqrt(len(pooled) / dof)
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            refit = _profiles(budgets, n, fitted + rng.choice(pooled, len(loss)))
            law = _power_law(refit)
            at_top = [p for p in refit if p.budget == top and not p.flag]
            if law is not None and at_top:
                samples.append({"a": law[0], "n_opt": at_top[0].n_opt})
        fit.bootstrap, fit.bootstrap_failed = bootstrap, bootstrap - len(samples)
        fit.intervals = _percentiles(samples, level)
    return fit
