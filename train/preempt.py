"""Stopping a run cleanly when its job is about to lose the machine (SLURM's pre-timeout signal,
a preemption): checkpoint at the next step boundary, leave a marker, exit 0.

A stop is requested by SIGUSR1 to a training process, or by the file RUN_DIR/slurm/stop (the
batch script of train/slurm.py touches it when SLURM signals the job: a file reaches every rank
whatever launcher sits between, where a signal to `accelerate launch` would not). Every rank
folds its request into the per-step loss reduction the loop already makes, so all ranks see it
at the same step and checkpoint together. The marker RUN_DIR/slurm/preempted (the step saved)
tells the batch script to requeue the job instead of ending it.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path


class StopRequest:
    def __init__(self, run_dir: Path, main_process: bool) -> None:
        self.dir = run_dir / "slurm"
        self.signalled = False
        if main_process:  # a new attempt: what the last one left is done with
            for name in ("stop", "preempted"):
                (self.dir / name).unlink(missing_ok=True)
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self) -> bool:
        """This rank's view: signalled, or the stop file exists (one stat per step)."""
        return self.signalled or (self.dir / "stop").exists()

    def mark(self, step: int) -> None:
        """Tell the batch script the run checkpointed at `step` and wants to be requeued."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".preempted.tmp"
        tmp.write_text(json.dumps({"step": step}) + "\n")
        tmp.replace(self.dir / "preempted")
