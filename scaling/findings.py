"""What `scaling.analysis.analyze` finds, as types, and their JSON form (fit.json, `fit --json`).

Each approach's fit under one compute definition (its exponents, the compute-optimal size at a
budget, bootstrap intervals, the optimizer's status), the leave-future-out check, the
inference-aware optimum, the LR check and the compute-definition ablation. The report, the plots
and the terminal read the fields; `Analysis.to_json` is the one place they become a mapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scaling.fit import IsoFlopProfile, ParametricFit
from scaling.record import Definition

Interval = tuple[float, float]  # (low, high) of a bootstrap percentile interval


@dataclass
class EnvelopePoint:
    """Approach 1 at one budget: the run with the lowest loss."""

    budget: float  # the budget's compute under the definition (the geometric mean of its runs')
    id: str
    n: float  # the run's N_C
    loss: float


@dataclass
class Approach1:
    """The lower envelope of final losses: N_opt ∝ C^a over the best run of each budget."""

    a: float | None  # None with fewer than 2 budgets
    b: float | None
    best: list[EnvelopePoint]


@dataclass
class Approach2:
    """IsoFLOP parabolas: N_opt ∝ C^a over the budgets whose minimum lies inside their sizes."""

    a: float | None  # None with fewer than 2 usable budgets
    b: float | None
    k: float | None  # N_opt = k·C^a
    profiles: list[IsoFlopProfile]
    intervals: dict[str, Interval]  # a, b, n_opt, tokens_per_param; {} without bootstrap refits
    level: float
    bootstrap: int
    bootstrap_failed: int
    n_opt: float | None = None  # at the largest usable budget, `at` (None: no budget usable)
    tokens_per_param: float | None = None
    at: float | None = None

    def to_json(self) -> dict:
        """Without a usable budget, the keys of its optimum are left out (not null)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("n_opt", "tokens_per_param", "at")}


@dataclass
class Approach3:
    """The parametric law L(N, D) = E + A/N^alpha + B/D^beta and its optimum at the budget `at`."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    a: float  # N_opt ∝ C^a
    b: float  # D_opt ∝ C^b
    n_opt: float  # at `at`
    d_opt: float
    tokens_per_param: float
    loss_opt: float
    intervals: dict[str, Interval]  # each of the above (and loss_pred: one run's loss at `at`)
    level: float
    bootstrap: int  # refits asked for
    bootstrap_failed: int
    converged: bool  # L-BFGS-B's own flag at the best start
    status: str  # its message
    objective: float  # summed Huber loss at the optimum
    runs: int
    at: float  # FLOPs
    starts: int | None  # L-BFGS starts (None: all of Chinchilla's grid)

    @classmethod
    def of(cls, fit: ParametricFit, level: float, starts: int | None) -> Approach3:
        """`fit` (fitted with its `at` set) as an Approach3."""
        return cls(
            **fit.values(),
            intervals=fit.intervals,
            level=level,
            bootstrap=fit.bootstrap,
            bootstrap_failed=fit.bootstrap_failed,
            converged=fit.converged,
            status=fit.status,
            objective=fit.objective,
            runs=fit.runs,
            at=fit.at,
            starts=starts,
        )

    def law(self) -> ParametricFit:
        """The fitted law, to evaluate at other sizes and budgets."""
        return ParametricFit(
            E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta, objective=self.objective, runs=self.runs
        )


@dataclass
class Holdout:
    """The leave-future-out check: approach 3 fitted without the largest budget, predicting it."""

    budget: float  # the held-out budget's compute
    runs_fitted: int
    predicted_loss_opt: float
    best_measured: float  # the lowest loss measured at the held-out budget
    best_id: str
    error: float  # predicted / measured - 1
    run_errors: dict[str, float]  # by run id: its predicted / measured loss - 1
    mean_abs_run_error: float


@dataclass
class InferenceOptimum:
    """The size reaching a budget's compute-optimal loss with the least training + inference compute."""

    loss: float  # the compute-optimal loss both sizes reach
    inference_tokens: float
    sampling_steps: int
    n: float
    d: float
    tokens_per_param: float
    total_flops: float
    compute_optimal_n: float
    compute_optimal_total_flops: float
    saving: float  # the share of the compute-optimal size's total compute saved


@dataclass
class LrCheck:
    """One (budget, depth) trained at several LR multipliers."""

    losses: dict[float, float]  # held-out loss by multiplier, in multiplier order
    best: float  # the multiplier with the lowest loss
    edge: bool  # the best is the smallest or the largest tried: the LR rule may be off there


# The ablation's columns in fit.json: what each approach answers under each definition.
ABLATION_FIELDS = {
    "approach3": ("a", "b", "tokens_per_param", "alpha", "beta", "E"),
    "approach2": ("a", "tokens_per_param"),
    "approach1": ("a",),
}


@dataclass
class AblationRow:
    """All three approaches under one compute definition (approach 3 without bootstrap refits,
    but for the primary definition's)."""

    approach3: Approach3
    approach2: Approach2
    approach1: Approach1

    def to_json(self) -> dict:
        return {name: {k: getattr(getattr(self, name), k) for k in keys} for name, keys in ABLATION_FIELDS.items()}


@dataclass
class Analysis:
    """Approaches 1-3 under the primary definition, the checks, and the ablation."""

    definition: Definition  # the primary: how the main fit counts compute
    runs: int  # fitted: those at the rule's LR
    budgets: int
    at: float  # the budget (FLOPs) approach 3's optimum is given at
    approach3: Approach3
    approach2: Approach2
    approach1: Approach1
    holdout: Holdout | None  # None with too few runs or budgets
    ablation: dict[Definition, AblationRow]
    lr_check: dict[str, LrCheck]  # by "C<budget>-d<depth>"
    inference: InferenceOptimum | None = None  # with lifetime inference tokens given

    def to_json(self) -> dict:
        """The JSON form: the three fits under "fit", the ablation's rows as ABLATION_FIELDS,
        "inference" only when computed."""
        out = {
            "definition": self.definition,
            "runs": self.runs,
            "budgets": self.budgets,
            "at": self.at,
            "fit": {
                "approach3": asdict(self.approach3),
                "approach2": self.approach2.to_json(),
                "approach1": asdict(self.approach1),
            },
            "holdout": None if self.holdout is None else asdict(self.holdout),
            "ablation": {name: row.to_json() for name, row in self.ablation.items()},
            "lr_check": {key: asdict(check) for key, check in self.lr_check.items()},
        }
        if self.inference is not None:
            out["inference"] = asdict(self.inference)
        return out
