"""Run records and the fits' JSON: a results.jsonl line written before the records were typed
reads back and is written again byte for byte, fit.json keeps its layout, and what is not a
record or not a definition is refused by name."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from scaling.analysis import analyze, approach2
from scaling.cli import main as scaling_main
from scaling.results import load_results, read_csv, write_results

# A line of results.jsonl as the untyped code wrote it (the miniature sweep's C1e09-d2; 1.0 = x1 LR).
OLD_LINE = r"""{"id": "C1e09-d2", "hash": "b35bc3e5", "dir": "runs/C1e09-d2-b35bc3e5", "budget": 1000000000.0, "depth": 2, "width": 16, "heads": 2, "lr": 0.002, "lr_multiplier": 1.0, "warmup_steps": 10, "steps": 41, "law_steps": 27, "params": {"dense": 8032, "attention": 0, "per_sample": 8192, "context": 0, "embedding": 0, "lm_head": 0, "frozen": 0}, "n": {"total": 16224, "non_embedding": 16224, "per_token": 8032, "embedding": 0}, "tokens": 15744, "samples": 328, "epochs": 0.10459183673469388, "scan_epochs": null, "flops": {"measured": 1004425216, "exact": 1004425216, "6N\u00b7D": 1532583936, "6N_total\u00b7D": 1532583936, "6N_per_token\u00b7D": 758734848}, "measured_by_part": {"dense": 701300736, "per_sample": 12931072, "attention": 290193408}, "budget_error": 0.00442521600000001, "loss": 1.156476080417633, "loss_se": 0.0167043899435596, "val_clips": 16, "train_loss": 1.1358217000961304, "wall_s": 4.043042069992225, "mfu": 0.0027308762153520714, "config_hash": "b35bc3e5"}"""

# A plan.json run entry as the untyped code wrote it (the miniature sweep's C1e09-d2, its config cut short).
OLD_PLAN_RUN = {
    "id": "C1e09-d2",
    "budget": 1e9,
    "depth": 2,
    "lr_multiplier": 1.0,
    "steps": 41,
    "law_steps": 27,
    "warmup_steps": 10,
    "lr": 0.002,
    "flops": 1004425216.0,
    "hash": "b35bc3e5",
    "train": {"max_steps": 41, "run_dir": "runs/C1e09-d2-b35bc3e5"},
    "dir": "runs/C1e09-d2-b35bc3e5",
}

# fit.json's keys in the order the untyped code wrote them ("*": every key of a mapping, "[]": every item of a list).
FIT_LAYOUT = {
    "": "definition runs budgets at fit holdout ablation lr_check inference",
    "fit": "approach3 approach2 approach1",
    "fit.approach3": "E A B alpha beta a b n_opt d_opt tokens_per_param loss_opt intervals level bootstrap "
    "bootstrap_failed converged status objective runs at starts",
    "fit.approach3.intervals": "E A B alpha beta a b n_opt d_opt tokens_per_param loss_opt loss_pred",
    "fit.approach2": "a b k profiles intervals level bootstrap bootstrap_failed n_opt tokens_per_param at",
    "fit.approach2.intervals": "a b n_opt tokens_per_param",
    "fit.approach2.profiles.[]": "budget sizes n_opt loss_opt flag",
    "fit.approach1": "a b best",
    "fit.approach1.best.[]": "budget id n loss",
    "holdout": "budget runs_fitted predicted_loss_opt best_measured best_id error run_errors mean_abs_run_error",
    "ablation": "given",
    "ablation.*": "approach3 approach2 approach1",
    "ablation.*.approach3": "a b tokens_per_param alpha beta E",
    "ablation.*.approach2": "a tokens_per_param",
    "ablation.*.approach1": "a",
    "lr_check": "C1e+18-d2",
    "lr_check.*": "losses best edge",
    "inference": "loss inference_tokens sampling_steps n d tokens_per_param total_flops compute_optimal_n "
    "compute_optimal_total_flops saving",
}


def _at(obj, path: str) -> list:
    """Every object at a FIT_LAYOUT path."""
    found = [obj]
    for step in path.split(".") if path else []:
        if step == "*":
            found = [v for o in found for v in o.values()]
        elif step == "[]":
            found = [v for o in found for v in o]
        else:
            found = [o[step] for o in found]
    return found


def _old_sweep(tmp_path, line: str = OLD_LINE):
    """A sweep directory holding one finished run, its result.json written as the untyped code wrote it."""
    old = json.loads(line)
    (tmp_path / old["dir"]).mkdir(parents=True)
    (tmp_path / old["dir"] / "result.json").write_text(json.dumps(old, indent=1))
    (tmp_path / "plan.json").write_text(json.dumps({"runs": [OLD_PLAN_RUN]}))
    return old


def test_a_record_written_before_reads_and_writes_back_byte_for_byte(tmp_path):
    old = _old_sweep(tmp_path)
    [record] = load_results(tmp_path)
    assert (record.id, record.depth, record.loss, record.loss_se) == (
        old["id"],
        old["depth"],
        old["loss"],
        old["loss_se"],
    )
    assert (
        record.flops["6N·D"] == 6 * record.n["non_embedding"] * record.tokens
        and record.law_n == old["n"]["non_embedding"]
    )
    assert record.n_eff("measured") == old["flops"]["measured"] / (6 * old["tokens"])
    assert json.dumps(record.to_json()) == OLD_LINE
    write_results(SimpleNamespace(runs=[SimpleNamespace(dir=old["dir"])]), tmp_path)
    assert (tmp_path / "results.jsonl").read_text() == OLD_LINE + "\n"


@pytest.mark.parametrize("edit", ["a field added", "the loss dropped"])
def test_a_result_that_is_not_a_record_is_refused_naming_its_file(tmp_path, edit):
    old = json.loads(OLD_LINE)
    if edit == "a field added":
        old["surprise"] = 1
    else:
        del old["loss"]
    _old_sweep(tmp_path, json.dumps(old))
    with pytest.raises(ValueError, match=r"result\.json: not a run record"):
        load_results(tmp_path)


def _law_csv(tmp_path):
    """Four isoFLOP budgets of five sizes each around a known law's optimum, as a CSV."""
    rng = np.random.default_rng(0)
    rows = ["params,tokens,loss"]
    for c in (1e17, 1e18, 1e19, 1e20):
        for f in (0.25, 0.5, 1, 2, 4):
            n = (c / 6) ** 0.5 * f
            d = c / (6 * n)
            rows.append(f"{n},{d},{(1.7 + 400 / n**0.34 + 400 / d**0.34) * np.exp(rng.normal(0, 0.002))}")
    path = tmp_path / "runs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_fit_json_keeps_its_layout(tmp_path):
    runs = [replace(r, depth=i % 5) for i, r in enumerate(read_csv(_law_csv(tmp_path)))]
    checks = [replace(runs[7], id=f"lr{m:g}", lr_multiplier=m, loss=runs[7].loss * (1 + m / 100)) for m in (0.5, 2.0)]
    analysis = analyze(runs + checks, bootstrap=10, inference_tokens=1e22)
    out = analysis.to_json()
    for path, keys in FIT_LAYOUT.items():
        for obj in _at(out, path):
            assert list(obj) == keys.split(), path
    assert json.loads(json.dumps(out))["lr_check"]["C1e+18-d2"]["losses"] == {
        "0.5": checks[0].loss,
        "1.0": runs[7].loss,
        "2.0": checks[1].loss,
    }
    assert out["fit"]["approach3"]["a"] == analysis.approach3.a and out["at"] == analysis.approach3.at
    # approach 2 without a usable budget (two sizes each): its optimum's keys are left out, not null
    two = approach2([r for r in runs if r.depth < 2], "given").to_json()
    assert list(two) == "a b k profiles intervals level bootstrap bootstrap_failed".split() and two["a"] is None


def test_fit_refuses_a_definition_by_its_flag(tmp_path, capsys):
    path = _law_csv(tmp_path)
    with pytest.raises(SystemExit):
        scaling_main(["fit", "--csv", str(path), "--definition", "6ND"])
    assert "--definition: invalid choice: '6ND'" in capsys.readouterr().err
    assert scaling_main(["fit", "--csv", str(path), "--bootstrap", "0", "--definition", "measured"]) == 2
    assert "compute definition 'measured' is not in the runs (have: given)" in capsys.readouterr().err


def test_plan_and_failure_files_read_back_as_records(tmp_path, capsys):
    """plan.json's runs and failed.json read as PlannedRun and Failure: an entry written before
    the types reads back and writes the same JSON; `scaling status` reads both."""
    from scaling.record import Failure, PlannedRun, read_planned_runs

    run = PlannedRun.from_json(OLD_PLAN_RUN)
    assert run.dir == OLD_PLAN_RUN["dir"] and json.dumps(run.to_json()) == json.dumps(OLD_PLAN_RUN)
    with pytest.raises(ValueError, match="holds no plan.json"):
        read_planned_runs(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({"runs": [OLD_PLAN_RUN]}))
    assert read_planned_runs(tmp_path) == [run]
    run_dir = tmp_path / run.dir
    run_dir.mkdir(parents=True)
    (run_dir / "failed.json").write_text(json.dumps({"returncode": 3, "tail": "no GPU for you", "time": 1.0}))
    assert Failure.read(run_dir) == Failure(returncode=3, tail="no GPU for you", time=1.0)
    assert scaling_main(["status", str(tmp_path)]) == 0
    assert (
        "C1e09-d2" in (out := capsys.readouterr().out)
        and "exit 3:" in out
        and "no GPU for you" in out
        and "1 failed" in out
    )
