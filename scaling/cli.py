"""`ministack scaling` (also `python -m scaling`): isoFLOP sweeps of the DiT and the laws they give.

  ministack scaling sweep SWEEP.yaml|PRESET [--dry-run] [--max-hours H] [--set KEY=VALUE]
      plan every run (length from the measured FLOPs per step), then train each unfinished one
      through `ministack train`; a killed sweep resumes, finished runs are skipped
  ministack scaling status SWEEP_DIR       each run: pending, started, finished, failed (with its log tail)
  ministack scaling fit SWEEP_DIR | --csv FILE [--json] [--bootstrap N] [--at FLOPS] [--definition D] [--plot PNG]
      Chinchilla's approaches 1-3, the leave-future-out check and the compute-definition ablation
      on whatever has finished (a sweep's also go to SWEEP_DIR/fit.json and fits.png)

Presets: cpu (a 2-core CPU, minutes), and any configs/scaling/NAME.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scaling.plan import Plan


def format_plan(plan: Plan, sweep_dir: Path) -> str:
    """The plan as a table: each run's size, steps (and 6ND's), FLOPs, estimated time; the total."""
    from scaling.runs import state

    lines = [f"sweep {plan.sweep.name} -> {sweep_dir}",
             f"data: {plan.data_clips:,} clips of latent {'x'.join(map(str, plan.latent))} (each run sees each at most once), "
             f"global batch {plan.sweep.hparams.batch_size}, {plan.sweep.processes} process(es) per run",
             "", f"{'depth':>5} {'width':>5} {'N (law)':>10} {'per_sample':>10} {'FLOPs/step':>11} {'6N·D/step':>10} {'s/step':>7}"]
    for size in plan.sizes.values():
        law = 6 * size.n * size.tokens_per_step
        timed = f"{size.s_per_step:7.3f}" if size.s_per_step is not None else f"{'-':>7}"
        lines.append(f"{size.depth:>5} {size.model.hidden_size:>5} {size.n:>10,} {size.params.get('per_sample', 0):>10,} "
                     f"{size.measured_per_step:>11.3e} {law:>10.3e} {timed}")
    lines += ["", f"{'run':<22} {'steps':>6} {'6ND steps':>9} {'warmup':>6} {'lr':>8} {'FLOPs':>10} {'vs budget':>9} {'est.':>7}  state"]
    total = 0.0
    for run in plan.runs:
        est = plan.estimate_s(run)
        total += est or 0.0
        lines.append(f"{run.id:<22} {run.steps:>6} {run.law_steps:>9} {run.warmup_steps:>6} {run.lr:>8.2e} {run.flops:>10.3e} "
                     f"{run.flops / run.budget - 1:>+9.2%} {'-' if est is None else f'{est:.0f} s':>7}  {state(sweep_dir, run)}")
    todo = sum(plan.estimate_s(r) or 0 for r in plan.runs if state(sweep_dir, r) != "finished")
    lines.append(f"\n{len(plan.runs)} runs, {sum(r.flops for r in plan.runs):.3e} FLOPs; estimated {total / 60:.1f} min "
                 f"on this device ({todo / 60:.1f} min left to run)")
    return "\n".join(lines)


def _interval(fit: dict, key: str) -> str:
    lo_hi = fit.get("intervals", {}).get(key)
    return f" [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ""


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_analysis(result: dict) -> str:
    """The fits as text: approach 3 with intervals, approaches 2 and 1, the ablation, the LR check."""
    a3, a2, a1 = (result["fit"][k] for k in ("approach3", "approach2", "approach1"))
    lines = [f"{result['runs']} runs over {result['budgets']} budgets; compute counted as {result['definition']}", "",
             f"Approach 3, L(N, D) = E + A/N^alpha + B/D^beta (summed Huber, delta 1e-3, L-BFGS; "
             f"{'converged' if a3['converged'] else 'NOT converged: ' + a3['status']}; "
             f"{a3['bootstrap']} bootstrap refits, {a3['bootstrap_failed']} failed; {a3['level']:.0%} intervals):"]
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        lines.append(f"  {key:<6} {a3[key]:.4g}{_interval(a3, key)}")
    lines += [f"  at C = {a3['at']:.3e}: N_opt {a3['n_opt']:.4g}{_interval(a3, 'n_opt')}, D_opt {a3['d_opt']:.4g}"
              f"{_interval(a3, 'd_opt')}, {a3['tokens_per_param']:.3g} tokens/param{_interval(a3, 'tokens_per_param')}, "
              f"loss {a3['loss_opt']:.4f}{_interval(a3, 'loss_opt')}"]
    if (h := result["holdout"]) is not None:
        lines.append(f"  leave-future-out: fitted on {h['runs_fitted']} runs without C {h['budget']:.3e}, it predicts the "
                     f"optimal loss there {h['predicted_loss_opt']:.4f} vs the best run's {h['best_measured']:.4f} "
                     f"({h['error']:+.1%}); its runs' losses within {h['mean_abs_run_error']:.1%} on average")
    lines += ["",
              f"Approach 2 (isoFLOP parabolas): a = {_num(a2['a'])}, b = {_num(a2['b'])}"]
    for p in a2["profiles"]:
        where = f"N_opt {p['n_opt']:.4g}, loss {p['loss_opt']:.4f}" if p["n_opt"] else "no minimum"
        lines.append(f"  C {p['budget']:.3e}: {len(p['sizes'])} sizes, {where}" + (f"  LEFT OUT: {p['flag']}" if p["flag"] else ""))
    lines += ["", f"Approach 1 (lowest loss per budget): a = {_num(a1['a'])}"]
    lines += [f"  C {b['budget']:.3e}: {b['id']} (N {b['n']:.4g}, loss {b['loss']:.4f})" for b in a1["best"]]
    lines += ["", "How the answer moves with the way compute is counted (N_C = C / 6D under each):",
              f"  {'compute':<16} {'a (A3)':>7} {'b (A3)':>7} {'tok/param (A3)':>14} {'a (A2)':>7} {'tok/param (A2)':>14} {'a (A1)':>7}"]
    for name, row in result["ablation"].items():
        t2 = row["approach2"]["tokens_per_param"]
        lines.append(f"  {name:<16} {row['approach3']['a']:>7.3f} {row['approach3']['b']:>7.3f} "
                     f"{row['approach3']['tokens_per_param']:>14.3g} {_num(row['approach2']['a']):>7} "
                     f"{'-' if t2 is None else f'{t2:.3g}':>14} {_num(row['approach1']['a']):>7}")
    if (inf := result.get("inference")) is not None:
        lines += ["", f"Inference-aware (Sardana & Frankle 2024): {inf['inference_tokens']:.3g} generated tokens x "
                      f"{inf['sampling_steps']} sampling steps at loss {inf['loss']:.4f}: N {inf['n']:.4g} trained on "
                      f"{inf['d']:.4g} tokens ({inf['tokens_per_param']:.3g} tokens/param), {inf['total_flops']:.3e} FLOPs in all, "
                      f"{inf['saving']:.1%} less than the compute-optimal N {inf['compute_optimal_n']:.4g}"]
    for key, check in result["lr_check"].items():
        tried = ", ".join(f"x{m:g}: {loss:.4f}" for m, loss in check["losses"].items())
        warn = "  WARNING: best LR at the edge of those tried; the LR rule may be off here" if check["edge"] else ""
        lines.append(f"LR check {key}: {tried}; best x{check['best']:g}{warn}")
    return "\n".join(lines)


def _sweep(args) -> int:
    from scaling.config import load_sweep_config
    from scaling.plan import plan_sweep, time_sizes
    from scaling.runs import run_sweep

    sweep = load_sweep_config(args.config, args.set)
    max_hours = args.max_hours if args.max_hours is not None else sweep.max_hours
    plan = plan_sweep(sweep)
    time_sizes(plan)
    sweep_dir = Path(args.out or sweep.out)
    print(format_plan(plan, sweep_dir))
    hours = sum(plan.estimate_s(r) for r in plan.runs) / 3600
    if max_hours and hours > max_hours:
        print(f"ministack scaling: error: the plan is estimated at {hours:.2f} h, over --max-hours {max_hours:g}",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    counts = run_sweep(plan, sweep_dir)
    return 1 if counts["failed"] else 0


def _status(args) -> int:
    from scaling.runs import log_tail

    plan_path = Path(args.sweep_dir) / "plan.json"
    if not plan_path.is_file():
        raise ValueError(f"{args.sweep_dir} holds no plan.json: not a sweep directory")
    runs = json.loads(plan_path.read_text())["runs"]
    counts: dict[str, int] = {}
    for run in runs:
        run_dir = Path(args.sweep_dir) / run["dir"]
        if (run_dir / "result.json").is_file():
            r = json.loads((run_dir / "result.json").read_text())
            status, detail = "finished", f"loss {r['loss']:.4f} ± {r['loss_se']:.4f}, {r['wall_s']:.0f} s"
        elif (run_dir / "failed.json").is_file():
            f = json.loads((run_dir / "failed.json").read_text())
            status, detail = "failed", f"exit {f['returncode']}:\n" + "\n".join("      " + x for x in f["tail"].splitlines())
        elif (run_dir / "log.jsonl").is_file():
            last = log_tail(run_dir / "log.jsonl", 1)
            step = json.loads(last)["step"] if last else 0
            status, detail = "started", f"step {step} of {run['steps']}"
        else:
            status, detail = "pending", f"{run['steps']} steps"
        counts[status] = counts.get(status, 0) + 1
        print(f"{run['id']:<22} {status:<9} {detail}")
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def _fit(args) -> int:
    from scaling.analysis import analyze
    from scaling.results import load_results, read_csv

    if (args.sweep_dir is None) == (args.csv is None):
        raise ValueError("give a SWEEP_DIR or --csv FILE (one of them)")
    results = read_csv(args.csv) if args.csv else load_results(Path(args.sweep_dir))
    result = analyze(results, primary=args.definition, bootstrap=args.bootstrap, at=args.at,
                     inference_tokens=args.inference_tokens or 0.0, sampling_steps=args.sampling_steps)
    print(json.dumps(result, indent=1) if args.json else format_analysis(result))
    plot = args.plot or (Path(args.sweep_dir) / "fits.png" if args.sweep_dir else None)
    if plot is not None:
        from scaling.plots import plot_fits

        print(f"plots: {plot_fits(results, result, plot)}", file=sys.stderr if args.json else sys.stdout)
    if args.sweep_dir:
        (Path(args.sweep_dir) / "fit.json").write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from profiling.inputs import parse_number

    p = argparse.ArgumentParser(prog="ministack scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="plan and run an isoFLOP sweep")
    s.add_argument("config", help="sweep YAML or preset name (cpu)")
    s.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; train nothing")
    s.add_argument("--max-hours", type=float, default=None, help="refuse a plan estimated longer than this")
    s.add_argument("--out", default=None, help="sweep directory (default: the config's out)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep field")
    s.set_defaults(func=_sweep)
    st = sub.add_parser("status", help="where each run of a sweep stands")
    st.add_argument("sweep_dir")
    st.set_defaults(func=_status)
    f = sub.add_parser("fit", help="fit the laws to a sweep's finished runs or to a CSV")
    f.add_argument("sweep_dir", nargs="?")
    f.add_argument("--csv", help="runs as CSV: params,tokens,loss[,flops][,budget]")
    f.add_argument("--json", action="store_true", help="one JSON object instead of text")
    f.add_argument("--bootstrap", type=int, default=1000, help="bootstrap refits for the intervals (default 1000)")
    f.add_argument("--at", type=parse_number, default=None, help="budget (FLOPs) for N_opt, D_opt, tokens/param")
    f.add_argument("--definition", default=None, help="compute definition of the main fit (default measured)")
    f.add_argument("--inference-tokens", type=parse_number, default=None,
                   help="lifetime generated tokens: add the size minimising training + inference compute")
    f.add_argument("--sampling-steps", type=int, default=50, help="denoising steps per generated sample (default 50)")
    f.add_argument("--plot", default=None, help="PNG of the fits (default for a sweep: SWEEP_DIR/fits.png)")
    f.set_defaults(func=_fit)
    args = p.parse_args(argv)
    from profiling.cpu import prepare_cpu

    prepare_cpu()
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"ministack scaling: error: {err}", file=sys.stderr)
        return 2
