"""A run's own records across restarts: which attempt wrote what, and each optimizer step once.

A run killed after step 9 with its last checkpoint at step 8 resumes at step 8 and trains step 9
again. Its `log.jsonl`, `ledger.jsonl` and `eval.jsonl` already hold a step 9 from the killed
attempt; appending the new one would count it twice (the run's own 6ND report would then see
one step's tokens twice). So when an attempt starts, before any rank writes, the main process
moves every line past the checkpoint's step into a `*.superseded.jsonl` sibling: nothing is
deleted (that compute was really spent, and the file says by which attempt), and the live files
then hold exactly the steps that produced the final weights, as an uninterrupted run's would.

Each start appends one line to `attempts.jsonl` (attempt number, the step it resumed from,
world size, time); every record the attempt writes carries its number.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from profiling.ledger import supersede_lines

ATTEMPTS = "attempts.jsonl"
# The run's step-indexed files, and which of their lines belong to the step sequence.
STEP_FILES = {
    "log.jsonl": lambda r: True,
    "eval.jsonl": lambda r: True,
    "ledger.jsonl": lambda r: r.get("kind") == "train",
}


def start_attempt(run: Path, resumed_from: int, world_size: int) -> int:
    """Record this start of `run` and supersede what earlier attempts wrote past `resumed_from`.

    Main process only, before any rank appends. Returns the attempt number (1 for a new run).
    A fresh start (`resumed_from` 0) in a directory an earlier run wrote supersedes all its steps.
    """
    path = run / ATTEMPTS
    previous = len(path.read_text().splitlines()) if path.is_file() else 0
    moved = {}
    for name, in_sequence in STEP_FILES.items():
        n = supersede_lines(run / name, lambda r: in_sequence(r) and (r.get("step") or 0) > resumed_from)  # noqa: B023 (called at once, inside the iteration)
        if n:
            moved[name] = n
    attempt = previous + 1
    entry = {
        "attempt": attempt,
        "resumed_from": resumed_from,
        "world_size": world_size,
        "time": time.time(),
        "superseded": moved,
    }
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return attempt


def superseded_summary(run: Path) -> str:
    """One line on what earlier attempts computed that the live ledger no longer counts ('' if nothing)."""
    path = run / "ledger.superseded.jsonl"
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    flops = sum(r.get("measured_flops", 0) for r in records)
    return (
        f"superseded: {len(records)} ledger record(s) of steps redone after a restart, {flops:.3e} FLOPs "
        f"spent again, kept in {path} (not counted above)"
    )
