"""A training step while another process keeps a core busy: torch's defaults against the thread policy.

torch's default team is one OpenMP thread per CPU of the affinity mask, and libgomp's threads spin
while they wait at a barrier. On a 2-core machine with one core busy elsewhere that team falls
off a cliff (a step 23.5-33.8 s instead of 1.4-2.0 s). The policy (profiling.cpu) sizes the team
to the cores others leave free, makes waiting threads sleep (OMP_WAIT_POLICY=PASSIVE) where a core
was taken when it started and, during a run, re-sizes it when the load changes (ThreadWatch). Arms, each a fresh process (the wait
policy is read once, when torch loads):

    today    torch's default thread count, the runtime's default (spinning) waits
    policy   what `ministack train` does: configure_openmp before torch, apply_thread_policy, ThreadWatch
    passive  (--passive-arm) torch's default thread count with passive waits: the wait policy alone

Scenarios, in interleaved pairs (the order alternates), each pair's ratio today/policy:

    busy     a busy-loop process runs during the whole arm (started before the arm's process)
    quiet    nothing else runs: the policy must cost nothing when every core is free
    late     (--late-pairs) the busy loop starts after the arm's warm-up step: the policy chose
             every core, ThreadWatch must notice and shrink the team

The step: the demo-sized text-conditioned tiny DiT with (1,4,4) patches on a 5x32x32 latent,
batch 32, flow-matching loss, fused AdamW (train.speed), fp32.

    python bench/busy_core.py                                 # busy and quiet, 3 pairs each (~6 min on 2 cores)
    python bench/busy_core.py --pairs 5 --late-pairs 2 --passive-arm
    python bench/busy_core.py --model configs/models/digits.yaml --batch 8 --steps 30 --passive-arm   # the demo's step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_OMP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SPIN = "import os, sys\nif len(sys.argv) > 1: os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass\n"


def spinner(cpu: int | None) -> subprocess.Popen:
    """A busy-loop child (one core's worth of someone else's work), pinned to `cpu` if given."""
    return subprocess.Popen([sys.executable, "-c", SPIN, *([] if cpu is None else [str(cpu)])])


def child(
    arm: str,
    steps: int,
    batch: int,
    latent: tuple[int, int, int],
    late_spin: bool,
    pin: int | None,
    model_config: str = "configs/models/tiny-p4.yaml",
) -> dict:
    """One arm in this (fresh) process: build, warm up one step, time `steps` steps."""
    sys.path.insert(0, str(ROOT))
    from profiling import threads as cpu

    if arm == "policy":
        cpu.configure_openmp()  # before torch loads
    elif arm == "passive":
        os.environ.setdefault(*cpu.WAIT_POLICY)  # passive whatever the load
    import torch

    from model.configs import load_config
    from model.dit import DiT
    from train.speed import adamw

    said: list[str] = []
    watch = None
    if arm == "policy":
        watch = cpu.ThreadWatch(cpu.apply_thread_policy(log=said.append), log=said.append)
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / model_config))
    model = DiT.from_dit_config(cfg)
    opt = adamw(model.parameters(), 1e-3, 0.0)
    x0 = torch.randn(batch, cfg.in_channels, *latent)
    context, mask = torch.randn(batch, 32, cfg.text_dim), torch.ones(batch, 32, dtype=torch.bool)
    mask[:, 12:] = False

    def step() -> None:
        noise, t = torch.randn_like(x0), torch.rand(batch)
        sigma = t.view(-1, 1, 1, 1, 1)
        out = model((1 - sigma) * x0 + sigma * noise, t * 1000, context=context, context_mask=mask)
        loss = (out - (noise - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    spin = spinner(pin) if late_spin else None
    times, cpu_s, threads = [], [], []
    try:
        for _ in range(steps):
            t, c = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t)
            cpu_s.append(time.process_time() - c)
            threads.append(torch.get_num_threads())
            if watch is not None:
                watch.step()
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    return {
        "arm": arm,
        "threads": threads,
        "step_s": times,
        "cpu_s": cpu_s,
        "said": said,
        "wait": cpu.wait_policy() if arm != "today" else "runtime default",
        "median_s": statistics.median(times),
    }


def run_arm(arm: str, args, busy: bool, late: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _OMP_VARS}
    cmd = (
        [
            sys.executable,
            __file__,
            "--child",
            arm,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--latent",
            args.latent,
            "--model",
            args.model,
        ]
        + (["--late-spin"] if late else [])
        + ([] if args.pin is None else ["--pin", str(args.pin)])
    )
    spin = spinner(args.pin) if busy else None
    try:
        if spin is not None:
            time.sleep(0.5)  # running before the arm's process looks at the load
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    if out.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenario(name: str, pairs: int, args, arms: list[str]) -> None:
    busy, late = name == "busy", name == "late"
    print(
        f"\n== {name}: {pairs} interleaved pairs, {args.steps} timed steps per arm (median), ratio = today / arm",
        flush=True,
    )
    medians: dict[str, list[float]] = {a: [] for a in arms}
    for i in range(pairs):
        order = arms if i % 2 == 0 else arms[::-1]
        got = {a: run_arm(a, args, busy, late) for a in order}
        for a in arms:
            medians[a].append(got[a]["median_s"])
        cells = []
        for a in arms:
            r = got[a]
            extra = "" if a == "today" else f" ({medians['today'][-1] / r['median_s']:.2f}x)"
            cells.append(
                f"{a} {r['median_s']:.2f} s/step{extra}, threads {'/'.join(map(str, sorted(set(r['threads']))))}"
            )
        print(f"pair {i + 1}: " + " | ".join(cells), flush=True)
        for a in arms:
            for line in got[a]["said"]:
                print(f"    {a}: {line}", flush=True)
    for a in arms[1:]:
        ratios = [t / p for t, p in zip(medians["today"], medians[a])]
        print(
            f"{name}: {a} vs today: median step {statistics.median(medians[a]):.2f} s vs "
            f"{statistics.median(medians['today']):.2f} s; speedup median {statistics.median(ratios):.2f}x, "
            f"worst pair {min(ratios):.2f}x",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="interleaved pairs per scenario (busy, quiet)")
    p.add_argument("--late-pairs", type=int, default=0, help="pairs of the 'load arrives mid-run' scenario")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--latent", default="5,32,32", help="latent T,H,W")
    p.add_argument(
        "--model", default="configs/models/tiny-p4.yaml", help="model config (the demo's: configs/models/digits.yaml)"
    )
    p.add_argument(
        "--pin", type=int, default=None, help="pin the busy loop to this CPU (default: the scheduler places it)"
    )
    p.add_argument("--passive-arm", action="store_true", help="also run torch's default threads with passive waits")
    p.add_argument("--scenarios", default="busy,quiet", help="comma-separated: busy, quiet (late: --late-pairs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--late-spin", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    latent = tuple(int(v) for v in args.latent.split(","))
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, latent, args.late_spin, args.pin, args.model)))
        return
    from profiling.cpu import _cpuinfo
    from profiling.threads import affinity

    print(
        f"CPU {_cpuinfo()[0]}, affinity {affinity()}, torch default threads = {len(affinity())}; "
        f"step: the DiT of {args.model}, batch {args.batch}, latent {args.latent}, fp32"
    )
    arms = ["today", "policy"] + (["passive"] if args.passive_arm else [])
    for name in args.scenarios.split(","):
        scenario(name, args.pairs, args, arms)
    if args.late_pairs:
        scenario("late", args.late_pairs, args, arms)


if __name__ == "__main__":
    main()
