"""A real one-host SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages,
with a config and all state under a temp directory (SLURM_CONF points the daemons and the
client commands at it), stopped by PID afterwards. Skips when the binaries are absent or this
is not root (the daemons run as root here; .ci/run installs the packages)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")


def _config(root: Path, host: str) -> str:
    """The cluster's slurm.conf, with two waits of SLURM's shortened for the requeue tests: a
    requeued job may start again only after its launch credential's lifetime (cred_expire,
    default 120 s; 10 s still gives a launch on a busy 2-core machine time to present it), and
    then starts at the next backfill pass (bf_interval, default every 30 s)."""
    cpus = os.cpu_count() or 2
    mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    return f"""ClusterName=ministack-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF set) in which sbatch, squeue and scontrol reach the cluster."""
    missing = [d for d in (*DAEMONS, "sbatch") if shutil.which(d) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(_config(root, host))
    env = os.environ | {"SLURM_CONF": str(root / "slurm.conf")}
    started: list[Path] = []
    munge_socket = Path("/run/munge/munge.socket.2")
    if not munge_socket.exists():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], check=True, env=env)
        started.append(Path("/run/munge/munged.pid"))
    subprocess.run(["slurmctld"], check=True, env=env)
    started.append(root / "slurmctld.pid")
    subprocess.run(["slurmd"], check=True, env=env)
    started.append(root / "slurmd.pid")

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
        return out.strip() in ("idle", "mix", "alloc")

    try:
        _wait(idle, 60, f"the test cluster's node never came up: see {root}/slurmctld.log and slurmd.log")
        yield env
    finally:
        for pid_file in reversed(started):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def job_state(env: dict, job: str) -> str | None:
    """The job's state from scontrol (PENDING, RUNNING, COMPLETED, FAILED, ...), None once forgotten."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def wait_for_job(env: dict, job: str, timeout: float = 600) -> str:
    """Block until the job ends; its final state."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", None)
    _wait(lambda: job_state(env, job) in ended, timeout, f"job {job} still {job_state(env, job)} after {timeout} s")
    return job_state(env, job) or "FORGOTTEN"
