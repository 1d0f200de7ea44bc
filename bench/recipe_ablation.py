"""What buys text alignment per FLOP: the demo's recipe with one lever changed at a time.

Each arm is a full `ministack train` run of CONFIG with its `--set` overrides (the baseline has
none), one after another on this machine, each in its own run directory and sharing the latent
cache. It prints, per arm, what the judge read at the end (class and motion accuracy with their
95 % intervals, the Frechet distance beside its real-vs-real floor), the validation loss, the
measured training FLOPs from the run's ledger and the wall time: arms that change the compute per
step (batch, patch, model size) say so in the FLOPs column rather than hiding it.

    python bench/recipe_ablation.py configs/train/demo.yaml \\
        --arm "lr 5e-4=lr=5e-4" --arm "ema 0.999=ema_decay=0.999" --arm "no cfg dropout=cond_drop=0;eval_guidance=1"

An arm is "NAME=KEY=VALUE[;KEY=VALUE...]". --set applies to every arm (e.g. a shorter run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Arm:
    name: str
    overrides: list[str]


def parse_arm(text: str) -> Arm:
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME=KEY=VALUE[;KEY=VALUE...]")
    return Arm(name, rest.split(";"))  # ";": values such as data.buckets hold commas


def run_arm(config: str, arm: Arm, common: list[str], out: Path) -> dict:
    """Train one arm; its final evaluation, measured FLOPs and wall time."""
    run = out / arm.name.replace(" ", "-")
    args = [sys.executable, "-m", "train", config, "--set", f"run_dir={run}"]
    for item in common + arm.overrides:
        args += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"arm": arm.name, "error": (proc.stdout + proc.stderr)[-2000:], "wall_s": wall}
    final = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines() if line.strip()]
    flops = sum(r.get("measured_flops", 0) for r in ledger)
    return {"arm": arm.name, "overrides": arm.overrides, "wall_s": wall, "flops": flops} | {
        k: final.get(k)
        for k in ("step", "val_loss", "accuracy", "interval", "chance", "fd", "fd_floor", "judge", "samples")
    }


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['arm']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} |"
    cells = [r["arm"], ", ".join(r["overrides"]) or "(baseline)"]
    for key in ("class", "motion"):
        if key in (r.get("accuracy") or {}):
            low, high = r["interval"][key]
            cells.append(f"{r['accuracy'][key]:.0%} [{low:.0%}, {high:.0%}]")
        else:
            cells.append("-")
    cells.append(f"{r['fd']:.1f} ({r['fd_floor']:.1f})" if r.get("fd") is not None else "-")
    cells += [f"{r['val_loss']:.4f}", f"{r['flops']:.2e}", f"{r['wall_s'] / 60:.1f} min"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--arm", type=parse_arm, action="append", default=[], help="NAME=KEY=VALUE[;KEY=VALUE...]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every arm")
    p.add_argument("--out", default="runs/ablation", help="parent of the arms' run directories")
    p.add_argument("--no-baseline", action="store_true", help="only the given arms")
    args = p.parse_args()
    arms = ([] if args.no_baseline else [Arm("baseline", [])]) + args.arm
    out = Path(args.out)
    rows = []
    print("| arm | overrides | class (chance 10 %) | motion (chance 12.5 %) | FD (floor) | val loss | FLOPs | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        rows.append(run_arm(args.config, arm, args.set, out))
        print(format_row(rows[-1]), flush=True)
    judge = next((r["judge"] for r in rows if r.get("judge")), None)
    if judge:
        print("judge on held-out real clips: " + ", ".join(f"{k} {v:.1%}" for k, v in judge.items()))
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
