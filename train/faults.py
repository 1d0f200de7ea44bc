"""What a training run does when something goes wrong around it: a second writer on its run
directory, a launcher that dies under its ranks, a step whose loss or gradients are not finite.

Each failure the user can act on is a `RunError`: `ministack train` prints its message and exits
1 without a traceback (train/cli.py), where a bug still shows its traceback.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK = ".lock"


class RunError(RuntimeError):
    """A run cannot go on for a reason its message states (a path, a step, a setting to change)."""


class RunLock:
    """An exclusive lock on a run directory, held for the life of the process that trains in it.

    fcntl.flock, not the `filelock` package: the kernel drops a flock when its holder dies however it
    dies (kill -9 included), so there is never a stale lock to clear, and the holder (pid, host,
    start time) is written into the locked file itself. filelock's Unix lock opens its file with
    O_TRUNC, so the second process would wipe the holder it is about to name. The lock works on
    local file systems and on NFS (Linux emulates flock with NFS byte-range locks).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise RunError naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunError(
                f"run directory {self.path.parent} is in use by another trainer ({_describe(holder)}; "
                f"lock {self.path}): wait for it to finish, or give this run another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Under a launcher (`accelerate launch`, torchrun: LOCAL_RANK is set), have the kernel kill this
    rank when the launcher dies, kill -9 included: its ranks would otherwise train on, holding the
    GPUs and the run directory, with nobody to collect them. Linux only (prctl); elsewhere a no-op."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the launcher died before the request took hold
        os.kill(os.getpid(), signal.SIGKILL)


class NonfiniteGuard:
    """The policy for a step whose loss or gradient norm is NaN or infinite (`nonfinite`,
    `max_nonfinite_steps` of the config).

    "skip": the step makes no update (optimizer, schedule and EMA untouched) and the run goes on;
    after `limit` consecutive skipped steps the run stops, since a run that keeps producing them
    has diverged and would only burn compute. "stop": the first one stops the run. Either way
    nothing non-finite is ever checkpointed, and the message names the step, the loss, the
    gradient norm and the batch (its clips' sources and noise seeds) so it can be replayed.
    """

    def __init__(self, policy: str, limit: int, log=print) -> None:
        self.policy, self.limit, self.log = policy, limit, log
        self.streak = 0

    def skip(self, step: int, finite: bool, detail: str) -> bool:
        """Whether optimizer step `step` must be skipped (`finite`: its loss and gradient norm were
        finite on every rank; `detail`: the loss, norm and batch, for the message); raises RunError
        when the run must stop instead."""
        if finite:
            self.streak = 0
            return False
        self.streak += 1
        what = f"step {step}: non-finite loss or gradient norm: {detail}"
        if self.policy == "stop" or self.streak > self.limit:
            why = (
                "nonfinite=stop"
                if self.policy == "stop"
                else f"{self.streak} consecutive non-finite steps, more than max_nonfinite_steps={self.limit}"
            )
            raise RunError(
                f"{what}; stopping the run ({why}). The last checkpoint holds the last finite weights: "
                f"lower lr (or raise warmup_steps / grad_clip) before resuming"
            )
        self.log(f"{what}: step skipped, no update ({self.streak} of at most {self.limit} in a row)")
        return True
