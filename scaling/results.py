"""One record per finished run, and the ways its training compute can be counted.

A record holds what a fit needs under every compute definition:

    measured        the ledger's FLOPs: ops that ran, forward + backward (profiling.measure)
    exact           the analytic count of the same ops (model.flops.formula)
    6N·D            6 x non-embedding trained parameters x tokens (Kaplan's N; the project's law)
    6N_total·D      6 x all trained parameters x tokens
    6N_per_token·D  6 x the parameters every token passes through (non-embedding minus the
                    per-sample adaLN / timestep MLP and the per-text-token context weights) x tokens

For a DiT these disagree in both directions: adaLN runs once per sample, not per token (6N·D
overcounts it), while attention adds compute no N holds (6N·D undercounts it). Fits under a
definition use its C and its effective parameter count N_C = C / (6 D), so the law's
"C = 6 N D" holds by construction (DeepSeek 2024's M = C / D, FLOPs per token, is 6 N_C).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from profiling.ledger import read_ledgers
from profiling.parts import CONTEXT, EMBEDDING, FROZEN, PER_SAMPLE, law_params
from scaling.record import Convention, RunRecord, read_planned_runs
from train.data.loader import GENERATED_KINDS

RESULTS = "results.jsonl"


def _last_line(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not lines:
        raise ValueError(f"{path} is missing or empty: the run did not finish")
    return json.loads(lines[-1])


def param_counts(params: dict[str, int]) -> dict[Convention, int]:
    """N under each parameter convention, from parameters by part."""
    n = law_params(params)
    return {
        "total": sum(v for k, v in params.items() if k != FROZEN),
        "non_embedding": n,
        "per_token": n - params.get(PER_SAMPLE, 0) - params.get(CONTEXT, 0),
        "embedding": params.get(EMBEDDING, 0),
    }


def _train_scans(data: dict) -> int:
    """How many images the training split draws from: digit scans (train.data.digits) or
    Fashion-MNIST training images (train.data.fashion)."""
    if data["kind"] == "fashion":
        from train.data.fashion import images

        return len(images("train", data.get("source") or None)[1])
    from train.data.digits import scans, split_scans

    return len(split_scans(scans()[1])[0])


def collect_result(plan, run, run_dir: Path) -> RunRecord:
    """The record of a finished run, read from its ledger, log and eval.jsonl: parameters by part,
    tokens, compute under every definition, held-out loss and its standard error, wall time, MFU.
    Raises ValueError if the run has not finished."""
    size = plan.sizes[run.depth]
    data = read_ledgers([run_dir / "ledger.jsonl"])
    records = [r for r in data.records if r.kind == "train"]
    steps = len({r.step for r in records})
    if steps != run.steps:
        raise ValueError(f"{run_dir}: the ledger holds {steps} steps, the plan {run.steps}")
    measured = sum(r.measured_flops - r.parts.get(FROZEN, 0) for r in records)
    tokens = sum(r.tokens for r in records)
    by_part: dict[str, int] = {}
    for r in records:
        for part, f in r.parts.items():
            if part != FROZEN:
                by_part[part] = by_part.get(part, 0) + f
    counts = param_counts(size.params)
    evaluation, last = _last_line(run_dir / "eval.jsonl"), _last_line(run_dir / "log.jsonl")
    peak_time = sum(r.wall_s * r.peak_flops for r in records)
    samples = steps * plan.sweep.hparams.batch_size
    kind = run.train["data"]["kind"]
    return RunRecord(
        id=run.id,
        hash=run.hash,
        dir=run.dir,
        budget=run.budget,
        depth=run.depth,
        width=size.model.hidden_size,
        heads=size.model.num_heads,
        lr=run.lr,
        lr_multiplier=run.lr_multiplier,
        warmup_steps=run.warmup_steps,
        steps=steps,
        law_steps=run.law_steps,
        params=size.params,
        n=counts,
        tokens=tokens,
        samples=samples,
        epochs=samples / plan.data_clips if kind in GENERATED_KINDS else None,
        scan_epochs=samples / _train_scans(run.train["data"]) if kind in ("digits", "fashion") else None,
        flops={
            "measured": measured,
            "exact": size.exact_per_step * steps,
            "6N·D": 6 * counts["non_embedding"] * tokens,
            "6N_total·D": 6 * counts["total"] * tokens,
            "6N_per_token·D": 6 * counts["per_token"] * tokens,
        },
        measured_by_part=by_part,
        budget_error=measured / run.budget - 1,
        loss=evaluation["val_loss"],
        loss_se=evaluation.get("val_loss_se"),
        val_clips=evaluation.get("val_clips"),
        train_loss=last["loss"],
        wall_s=sum(r.wall_s for r in records if not r.rank),
        mfu=measured / peak_time if peak_time else None,
        config_hash=run.hash,
    )


def write_results(plan, sweep_dir: Path) -> list[RunRecord]:
    """Collate the plan's finished runs into SWEEP_DIR/results.jsonl (atomically) and return them."""
    results = load_results(sweep_dir, plan=[r.dir for r in plan.runs])
    tmp = sweep_dir / f".{RESULTS}.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(r.to_json()) + "\n" for r in results))
    os.replace(tmp, sweep_dir / RESULTS)
    return results


def load_results(sweep_dir: Path, plan: list[str] | None = None) -> list[RunRecord]:
    """The result.json of every finished run of the sweep's plan (plan.json unless `plan` lists
    the run directories), in plan order. Raises ValueError when there is no plan or a
    result.json is not a run record."""
    sweep_dir = Path(sweep_dir)
    if plan is None:
        plan = [r.dir for r in read_planned_runs(sweep_dir)]
    out = []
    for run_dir in plan:
        path = sweep_dir / run_dir / "result.json"
        if path.is_file():
            out.append(RunRecord.from_json(json.loads(path.read_text()), path))
    return out


def read_csv(path: str | Path) -> list[RunRecord]:
    """Runs from a CSV with columns params, tokens, loss and optionally flops (else 6 · params ·
    tokens) and budget (the isoFLOP group; else flops rounded to 2 significant digits). Records
    carry one compute definition, "given". Without a budget column, runs are grouped into isoFLOP
    budgets by compute: sorted by log C, a run within 0.1 decades (26 %) of its group's smallest
    joins the group (data digitised from a figure scatters around each budget), and a group's
    budget is its geometric mean. Raises ValueError naming a missing column or bad row."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = {"params", "tokens", "loss"} - set(rows[0])
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))} (have: {', '.join(rows[0])})")
    out = []
    for i, row in enumerate(rows, 2):
        try:
            n, d, loss = float(row["params"]), float(row["tokens"]), float(row["loss"])
            c = float(row["flops"]) if row.get("flops") not in (None, "") else 6 * n * d
            budget = float(row["budget"]) if row.get("budget") not in (None, "") else None
        except ValueError as err:
            raise ValueError(f"{path}, line {i}: {err}") from None
        out.append(RunRecord(id=f"row{i}", budget=budget, n={"given": n}, tokens=d, loss=loss, flops={"given": c}))
    _group_budgets([r for r in out if r.budget is None])
    return out


def _group_budgets(runs: list[RunRecord], decades: float = 0.1) -> None:
    """Set each run's budget to the geometric mean compute of its cluster in log C."""
    runs = sorted(runs, key=lambda r: r.flops["given"])
    group: list[RunRecord] = []
    for r in runs + [None]:
        if r is None or (group and math.log10(r.flops["given"] / group[0].flops["given"]) > decades):
            budget = math.exp(sum(math.log(g.flops["given"]) for g in group) / len(group)) if group else 0.0
            for g in group:
                g.budget = budget
            group = []
        if r is not None:
            group.append(r)
