"""The sweep's plan, the fits and the context measurements as text for the terminal, and the
fits as a markdown report with their provenance."""

from __future__ import annotations

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
    lines += ["", f"Approach 2 (isoFLOP parabolas): a = {_num(a2['a'])}{_interval(a2, 'a')}, b = {_num(a2['b'])}{_interval(a2, 'b')}"
                  + (f"; at C = {a2['at']:.3e}: N_opt {a2['n_opt']:.4g}{_interval(a2, 'n_opt')}, "
                     f"{a2['tokens_per_param']:.3g} tokens/param{_interval(a2, 'tokens_per_param')}" if a2.get("at") else "")
                  + (f" ({a2['bootstrap']} residual-bootstrap refits, {a2['bootstrap_failed']} failed)" if a2.get("bootstrap") else "")]
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


def format_context(report: dict) -> str:
    """`scaling context`'s table: per context, FLOPs per decoded token (measured by part, the
    formula, 2N), TTFT and TPOT; then the crossovers."""
    a = report["analysis"]
    lines = [f"decode of batch {a['batch']}: FLOPs and time per generated token vs context "
             f"(law 2N = {a['law_flops_per_token']:.4g}; weights {a['weight_bytes'] / 2**20:.1f} MiB, "
             f"K/V {a['kv_bytes_per_key'] / 1024:.1f} KiB per key)", "",
             f"{'context':>8} {'weights':>10} {'attention':>10} {'measured':>10} {'formula':>10} {'/ 2N':>6} "
             f"{'attn share':>10} {'TTFT s':>8} {'TPOT ms':>8} {'min-max ms':>13} {'K/V MiB':>8}"]
    for p in report["points"]:
        measured, formula = sum(p["decode_flops"].values()), sum(p["formula_flops"].values())
        attention = p["decode_flops"].get("attention", 0)
        lo, hi = p["tpot_spread_s"]
        lines.append(f"{p['context']:>8} {measured - attention:>10.4g} {attention:>10.4g} {measured:>10.4g} {formula:>10.4g} "
                     f"{measured / p['law_flops']:>6.2f} {attention / measured:>10.1%} {p['ttft_s']:>8.2f} "
                     f"{p['tpot_s'] * 1e3:>8.2f} {f'{lo * 1e3:.1f}-{hi * 1e3:.1f}':>13} {p['kv_bytes'] / 2**20:>8.1f}")
    fit, turn = a["tpot_fit"], a["tpot_turn"]
    lines += ["", f"measured FLOPs within {a['measured_vs_formula_max_gap']:.2%} of the formula at every context",
              f"attention's FLOPs equal the weights' at context {a['attention_equals_weights_flops']:,.0f}",
              f"one step's K/V bytes equal the weights' at context {a['kv_equals_weight_bytes']:,.0f}"]
    if fit is None:
        lines.append("TPOT turn: needs at least 3 contexts")
    else:
        where = (f"the context-proportional time equals the fixed time at context {turn:,.0f}" if turn is not None
                 else "TPOT does not grow with the context over the contexts measured: no turn")
        lines.append(f"TPOT = {fit['fixed_s'] * 1e3:.2f} ms + {fit['per_context_token_s'] * 1e6:.3f} µs x context: {where}")
    return "\n".join(lines)
