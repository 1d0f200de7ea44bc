"""Scaling-law fits recover known laws from synthetic runs (scaling.fit)."""

import numpy as np
import pytest

from scaling.fit import ParametricFit, fit_isoflop, fit_parametric

# Epoch's refit of Chinchilla (Besiroglu et al. 2024, table 1): E 1.82, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658
TRUE = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
COARSE = {
    "alpha": [0.0, 0.5, 1.0],
    "beta": [0.0, 0.5, 1.0],
    "e": [0.0, 1.0],
    "a": [0.0, 5.0, 10.0],
    "b": [0.0, 5.0, 10.0],
}


def law(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def isoflop_runs(budgets, per_budget=7, noise=0.0, seed=0):
    """Runs at each budget C = 6·N·D, sizes log-spaced around the law's optimum."""
    rng = np.random.default_rng(seed)
    a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    g = (TRUE["alpha"] * TRUE["A"] / (TRUE["beta"] * TRUE["B"])) ** (1 / (TRUE["alpha"] + TRUE["beta"]))
    rows = []
    for c in budgets:
        n_opt = g * (c / 6) ** a
        for n in n_opt * np.logspace(-0.75, 0.75, per_budget):
            d = c / (6 * n)
            rows.append((c, n, d, law(n, d) * np.exp(noise * rng.standard_normal())))
    return np.array(rows).T


def test_parametric_fit_recovers_the_law_and_its_optimal_split():
    c, n, d, loss = isoflop_runs([1e18, 1e19, 1e20, 1e21, 1e22], noise=0.0)
    fit = fit_parametric(n, d, loss, grid=COARSE)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.02) and fit.beta == pytest.approx(TRUE["beta"], rel=0.02)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.02)
    assert fit.a == pytest.approx(0.3658 / (0.3478 + 0.3658), rel=0.02)  # 0.5126: N_opt ∝ C^a
    assert fit.loss(n, d) == pytest.approx(loss, rel=1e-3)


def test_bootstrap_intervals_hold_the_fit_and_widen_with_noise():
    widths = []
    for noise in (0.002, 0.02):
        c, n, d, loss = isoflop_runs([1e18, 1e19, 1e20, 1e21, 1e22], noise=noise, seed=1)
        fit = fit_parametric(n, d, loss, grid=COARSE, bootstrap=60, seed=0, level=0.95)
        for key in ("alpha", "beta", "E", "a"):
            assert fit.intervals[key][0] <= fit.values()[key] <= fit.intervals[key][1]
        widths.append(fit.intervals["a"][1] - fit.intervals["a"][0])
    assert widths[1] > 3 * widths[0]  # ten times the noise: a much wider interval for the optimal split


def test_extrapolation_to_a_named_budget_has_a_prediction_interval_around_the_truth():
    c, n, d, loss = isoflop_runs([1e18, 1e19, 1e20, 1e21], noise=0.01, seed=2)
    fit = fit_parametric(n, d, loss, grid=COARSE, bootstrap=200, seed=0, level=0.9, at=1e23)
    exact = ParametricFit(**TRUE, objective=0.0, runs=0, at=1e23).values()["loss_opt"]
    (lo, hi), (plo, phi) = fit.intervals["loss_opt"], fit.intervals["loss_pred"]
    assert plo <= exact <= phi  # two decades past the data: the predicted loss of the optimal run
    assert plo < lo and phi > hi  # a run's scatter widens the interval of the law's optimum


def test_isoflop_profiles_give_the_exponent_and_flag_off_grid_budgets():
    c, n, d, loss = isoflop_runs([1e18, 1e19, 1e20, 1e21])
    # a budget whose sizes all lie below its optimum: its minimum is at the edge of what was tried
    extra_c = 1e22
    sizes = np.logspace(8, 9, 5)
    c = np.concatenate([c, np.full(5, extra_c)])
    n = np.concatenate([n, sizes])
    loss = np.concatenate([loss, law(sizes, extra_c / (6 * sizes))])
    fit = fit_isoflop(c, n, loss)
    flags = {p.budget: p.flag for p in fit.profiles}
    assert flags[extra_c] and not any(flags[b] for b in (1e18, 1e19, 1e20, 1e21))
    assert fit.a == pytest.approx(0.5126, abs=0.02)  # the parabola approximates the exact profile


def test_isoflop_bootstrap_intervals_cover_the_exponent_and_widen_with_noise():
    widths = []
    for noise in (0.002, 0.01):
        c, n, _, loss = isoflop_runs([1e18, 1e19, 1e20, 1e21, 1e22], noise=noise, seed=3)
        fit = fit_isoflop(c, n, loss, bootstrap=300, level=0.95, seed=0)
        lo, hi = fit.intervals["a"]
        assert lo <= fit.a <= hi and lo <= 0.5126 <= hi  # the law's own a (the parabolas' bias is ~0.005)
        top = max((p for p in fit.profiles if not p.flag), key=lambda p: p.budget)
        assert fit.intervals["n_opt"][0] <= top.n_opt <= fit.intervals["n_opt"][1]
        assert fit.bootstrap == 300 and 0 <= fit.bootstrap_failed < 30
        widths.append(hi - lo)
    assert widths[1] > 3 * widths[0]
    # an exact fit (3 sizes per budget interpolate their parabola): no residuals, no interval claimed
    c, n, _, loss = isoflop_runs([1e18, 1e19, 1e20], per_budget=3)
    assert fit_isoflop(c, n, loss, bootstrap=50).intervals == {}


def test_a_runaway_refit_gives_nan_not_an_error():
    """A bootstrap refit whose A or B overflowed (seen on the cpu sweep's data) is dropped as failed."""
    for A, B in ((float("inf"), 1e3), (1e3, float("inf")), (0.0, 1e3)):
        values = ParametricFit(E=1.0, A=A, B=B, alpha=0.3, beta=0.3, objective=0.0, runs=0, at=1e20).values()
        assert np.isnan(values["n_opt"]) and np.isnan(values["tokens_per_param"])


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_parametric([1e6] * 4, [1e9] * 4, [3.0] * 4)
    with pytest.raises(ValueError, match="positive"):
        fit_parametric([1e6, 2e6, 3e6, 4e6, -1], [1e9] * 5, [3.0] * 5)
    fit = fit_isoflop([1e18, 1e18], [1e6, 2e6], [3.0, 2.9])
    assert fit.a is None and "parabola needs 3" in fit.profiles[0].flag
    with pytest.raises(ValueError, match="fewer than 2 budgets"):
        fit.n_opt(1e20)
