"""`ministack scaling` (also `python -m scaling`): isoFLOP sweeps of the DiT and the laws they give.

  ministack scaling sweep SWEEP.yaml|PRESET [--dry-run [--no-timing]] [--executor local|slurm] [--max-hours H] [--set KEY=VALUE]
      plan every run (length from the measured FLOPs per step), then train each unfinished one
      through `ministack train`; a killed sweep resumes, finished runs are skipped
  ministack scaling status SWEEP_DIR       each run: pending, started, finished, failed (with its log tail)
  ministack scaling context [--contexts 128,...,8000] [--batch B] [--model M] [--out DIR]
      serving: measured FLOPs and time per generated token vs context, against 2N and the formula
  ministack scaling fit SWEEP_DIR | --csv FILE [--json] [--bootstrap N] [--at FLOPS] [--definition D] [--plot PNG]
      Chinchilla's approaches 1-3, the leave-future-out check and the compute-definition ablation
      on whatever has finished (a sweep's also go to SWEEP_DIR/fit.json, fits.png and report.md)

Presets: cpu (a 2-core CPU, minutes), gpu-1 (one H100/H200), gpu-8 (eight, through accelerate),
and any configs/scaling/NAME.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from scaling.record import Definition, PlannedRun
from scaling.report import Provenance, format_analysis, format_plan
from serve.cli import add_engine_arguments


def _cpu_threads() -> None:
    """Size torch's thread team to the cores other work leaves free (profiling.threads), on a CPU."""
    import torch

    if not torch.cuda.is_available():
        from profiling.threads import apply_thread_policy

        apply_thread_policy()


def _sweep(args) -> int:
    from scaling.config import load_sweep_config
    from scaling.plan import plan_sweep, time_sizes
    from scaling.runs import run_sweep

    sweep = load_sweep_config(args.config, args.set)
    max_hours = args.max_hours if args.max_hours is not None else sweep.max_hours
    plan = plan_sweep(sweep)
    if args.no_timing and not args.dry_run and args.executor == "local":
        raise ValueError("--no-timing plans without the wall-time estimate --max-hours needs: use it with --dry-run")
    timed = not args.no_timing and args.executor == "local"  # a login node's speed says nothing of the cluster's
    if timed:
        _cpu_threads()  # the runs each choose their own as they start (train.loop): time the sizes alike
        time_sizes(plan)
    sweep_dir = Path(args.out or sweep.out)
    print(format_plan(plan, sweep_dir))
    if args.executor == "slurm":
        c = sweep.slurm
        print(
            f"SLURM: one job array, a task per unfinished run, at most {c.array_parallelism} at once; each task "
            f"{c.time_min} min, {c.gpus_per_node} GPU(s), {c.cpus_per_task} CPU(s)"
            + (f", {c.mem_gb:g} GB" if c.mem_gb else "")
            + (f", partition {c.partition}" if c.partition else "")
            + (f", account {c.account}" if c.account else "")
            + f"; SIGUSR2 {c.signal_delay_s} s before the limit"
            + "".join(f", --{k}={v}" for k, v in c.sbatch.items())
        )
    hours = sum(plan.estimate_s(r) for r in plan.runs) / 3600 if timed else 0.0
    if max_hours and hours > max_hours:
        print(
            f"ministack scaling: error: the plan is estimated at {hours:.2f} h, over --max-hours {max_hours:g}",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        return 0
    if args.executor == "slurm":
        from scaling.slurm import submit_sweep

        try:
            submit_sweep(plan, sweep_dir, sweep.slurm)
        except RuntimeError as err:
            raise ValueError(str(err)) from None
        return 0
    counts = run_sweep(plan, sweep_dir)
    return 1 if counts["failed"] else 0


def _status(args) -> int:
    from scaling.record import read_planned_runs
    from scaling.slurm import task_states

    sweep_dir = Path(args.sweep_dir)
    runs = read_planned_runs(sweep_dir)
    tasks = task_states(sweep_dir)  # run id -> (SLURM task id, its state) for a sweep submitted with --executor slurm
    counts: dict[str, int] = {}
    for run in runs:
        status, detail = _run_status(sweep_dir, run)
        if run.id in tasks and status not in ("finished", "failed"):
            task, slurm_state = tasks[run.id]
            status = {"RUNNING": "running", "PENDING": "queued"}.get(slurm_state or "", status)
            detail += f" (SLURM {task}: {slurm_state or 'not in the queue'})"
        counts[status] = counts.get(status, 0) + 1
        print(f"{run.id:<22} {status:<9} {detail}")
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def _run_status(sweep_dir: Path, run: PlannedRun) -> tuple[str, str]:
    """A run's state on disk and the line `status` prints after it."""
    from scaling.record import Failure, RunRecord
    from scaling.runs import log_tail, state

    run_dir, status = sweep_dir / run.dir, state(sweep_dir, run)
    if status == "finished":
        r = RunRecord.from_json(json.loads((run_dir / "result.json").read_text()), run_dir / "result.json")
        return status, f"loss {r.loss:.4f} ± {r.loss_se:.4f}, {r.wall_s:.0f} s"
    if status == "failed":
        f = Failure.read(run_dir)
        return status, f"exit {f.returncode}:\n" + "\n".join("      " + x for x in f.tail.splitlines())
    if status == "started":
        last = log_tail(run_dir / "log.jsonl", 1)
        return status, f"step {json.loads(last)['step'] if last else 0} of {run.steps}"
    return status, f"{run.steps} steps"


def _provenance(args, plot: Path | None, report: Path) -> Provenance:
    """Where the fitted data came from and the commands, for the markdown report."""
    import shlex
    import subprocess

    out = Provenance(source=args.csv or args.sweep_dir, command="ministack scaling " + shlex.join(args.argv))
    if plot is not None:
        out.plot = (
            str(Path(plot).resolve().relative_to(report.parent.resolve()))
            if Path(plot).resolve().is_relative_to(report.parent.resolve())
            else str(plot)
        )
    plan_path = Path(args.sweep_dir or "") / "plan.json"
    if args.sweep_dir and plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        sweep, data = plan["sweep"], plan["sweep"]["train"]["data"]
        out.sweep_command = f"ministack scaling sweep {sweep['name']} --out {args.sweep_dir}"
        out.sweep_data = (
            f"data {data.get('kind', 'procedural')}, {plan['data_clips']:,} clips of latent "
            f"{'x'.join(map(str, plan['latent']))}, global batch {sweep['hparams']['batch_size']}"
        )
    here = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout
        out.code = f"ministack at commit {git.stdout.strip()}" + (" with uncommitted changes" if dirty.strip() else "")
    return out


def _starts(value: str) -> int | None:
    """--starts: a positive count, or 'all' (None: every grid point)."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a positive number of starts or 'all', got {value!r}")
    return int(value)


def _fit(args) -> int:
    from scaling.analysis import analyze
    from scaling.report import markdown_report
    from scaling.results import load_results, read_csv

    if (args.sweep_dir is None) == (args.csv is None):
        raise ValueError("give a SWEEP_DIR or --csv FILE (one of them)")
    results = read_csv(args.csv) if args.csv else load_results(Path(args.sweep_dir))
    result = analyze(
        results,
        primary=args.definition,
        bootstrap=args.bootstrap,
        at=args.at,
        inference_tokens=args.inference_tokens or 0.0,
        sampling_steps=args.sampling_steps,
        starts=args.starts,
    )
    print(json.dumps(result.to_json(), indent=1) if args.json else format_analysis(result))
    side = sys.stderr if args.json else sys.stdout
    plot = args.plot or (Path(args.sweep_dir) / "fits.png" if args.sweep_dir else None)
    if plot is not None:
        from scaling.plots import plot_fits

        print(f"plots: {plot_fits(results, result, plot)}", file=side)
    if args.sweep_dir:
        (Path(args.sweep_dir) / "fit.json").write_text(json.dumps(result.to_json(), indent=1))
    report = args.report or (Path(args.sweep_dir) / "report.md" if args.sweep_dir else None)
    if report is not None:
        report = Path(report)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(markdown_report(result, results, _provenance(args, plot, report)))
        print(f"report: {report}", file=side)
    return 0


def _context(args) -> int:
    from profiling.hardware import device_peak
    from profiling.bandwidth import device_bandwidth
    from scaling.context import (
        ContextReport,
        DeviceBandwidth,
        DevicePeak,
        analyze_context,
        measure_context,
        weight_bytes,
    )
    from scaling.plots import plot_context
    from scaling.report import format_context
    from serve.cli import engine_config
    from serve.engine.llm_engine import LLMEngine

    try:
        contexts = [int(x) for x in args.contexts.split(",")]
    except ValueError:
        raise ValueError(f"--contexts takes comma-separated token counts, got {args.contexts!r}") from None
    engine = LLMEngine(engine_config(args, max_num_seqs=max(args.batch, 1), enable_prefix_caching=False))
    try:
        points = measure_context(engine, contexts, batch=args.batch, decode_tokens=args.decode_tokens)
    except ValueError as err:
        raise ValueError(f"{err} (--contexts, --batch, --decode-tokens, --kv-cache-gb)") from None
    peak = device_peak(engine.device, engine.dtype)
    bw = device_bandwidth(engine.device)  # cached per device; a first run probes it (seconds)
    report = ContextReport(
        points,
        analyze_context(points, weight_bytes(engine.model)),
        model=engine.model_name,
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        kv_cache_dtype=str(engine.kv_dtype).removeprefix("torch."),
        peak=DevicePeak(flops=peak.flops, source=f"{peak.device} {peak.dtype} peak ({peak.source})"),
        bandwidth=DeviceBandwidth(bytes_per_s=bw.bytes_per_s, source=f"{bw.device}, {bw.source}"),
    )
    print(json.dumps(report.to_json(), indent=1) if args.json else format_context(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "context.json").write_text(json.dumps(report.to_json(), indent=1))
        print(f"plots: {plot_context(report, out / 'context.png')}", file=sys.stderr if args.json else sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    from profiling.inputs import parse_number

    p = argparse.ArgumentParser(
        prog="ministack scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="plan and run an isoFLOP sweep")
    s.add_argument("config", help="sweep YAML or preset name (cpu, cpu-digits, gpu-1, gpu-8)")
    s.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; train nothing")
    s.add_argument("--max-hours", type=float, default=None, help="refuse a plan estimated longer than this")
    s.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="local: each run in turn here (default); slurm: one job array, a task per unfinished run",
    )
    s.add_argument(
        "--no-timing",
        action="store_true",
        help="with --dry-run: steps and FLOPs only, no timed steps (e.g. a GPU preset planned on a laptop)",
    )
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
    f.add_argument(
        "--starts",
        type=_starts,
        default=100,
        help="approach 3: L-BFGS from this many of Chinchilla's 4,500 grid points, those starting lowest, "
        "or 'all' as Epoch did (default 100)",
    )
    f.add_argument("--at", type=parse_number, default=None, help="budget (FLOPs) for N_opt, D_opt, tokens/param")
    f.add_argument(
        "--definition",
        choices=get_args(Definition),
        default=None,
        help="compute definition of the main fit (default measured; a CSV's is given)",
    )
    f.add_argument(
        "--inference-tokens",
        type=parse_number,
        default=None,
        help="lifetime generated tokens: add the size minimising training + inference compute",
    )
    f.add_argument("--sampling-steps", type=int, default=50, help="denoising steps per generated sample (default 50)")
    f.add_argument("--plot", default=None, help="PNG of the fits (default for a sweep: SWEEP_DIR/fits.png)")
    f.add_argument(
        "--report", default=None, help="markdown report with provenance (default for a sweep: SWEEP_DIR/report.md)"
    )
    f.set_defaults(func=_fit)
    c = sub.add_parser("context", help="serving: measured FLOPs and time per generated token vs context length")
    add_engine_arguments(c)
    c.add_argument(
        "--contexts", default="128,512,1024,2048,4096,8000", help="prompt lengths in tokens, comma-separated"
    )
    c.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    c.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per context (default 16)")
    c.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    c.add_argument("--out", default=None, help="directory for context.json and context.png")
    c.set_defaults(func=_context)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from profiling.cpu import prepare_cpu

    prepare_cpu()
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"ministack scaling: error: {err}", file=sys.stderr)
        return 2
