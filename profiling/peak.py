"""`ministack flops peak`: the peak FLOP/s every MFU here is computed against, and where it came from.

This CPU's peaks are measured (profiling.cpu) and cached per machine; shown with when they were
measured, the machine's load while they were (profiling.load), and any raise since (an achieved
FLOP/s above the peak). `--reprobe` measures them again now; run it on a quiet machine. A CUDA
device's dense peaks come from the data-sheet table (profiling.hardware) and are listed too.

Beside each peak, the device's memory bandwidth (profiling.bandwidth, a STREAM-style probe,
cached the same way): the denominator of MBU, as the peak is MFU's. `--reprobe` redoes it too;
`--no-bandwidth` leaves it out (a first probe takes seconds).
"""

from __future__ import annotations

import argparse
import json

from profiling.hardware import format_rate, utc_time


def _cpu_rows(entry: dict) -> list[str]:
    from profiling.load import Load

    load = Load.from_dict(entry["load"])
    avg = f"; load average {load.load_avg[0]:.2f}" if load.load_avg else ""
    rows = [f"measured {utc_time(entry['measured_at'])}, {load.describe()}{avg}"]
    for dtype in ("fp32", "bf16"):
        rows.append(f"  {dtype:<5} {format_rate(entry[dtype]):>14}")
        if dtype in entry.get("raised", {}):
            r = entry["raised"][dtype]
            times = f" ({r['raises']} raises)" if r.get("raises", 1) > 1 else ""
            rows[-1] += (
                f"   raised from the probe's {format_rate(r['from'])}{times}, last {utc_time(r['at'])} by {r['by']}"
            )
    if load.contended:
        rows.append(
            "  warning: measured under load, so MFU against it reads high: run `ministack flops peak "
            "--reprobe` on a quiet machine"
        )
    return rows


def _bandwidth_row(bw) -> str:
    from profiling.bandwidth import format_bandwidth

    kernels = ", ".join(f"{k} {format_bandwidth(v)}" for k, v in bw.kernels.items())
    row = f"  memory bandwidth {format_bandwidth(bw.bytes_per_s)} (STREAM {kernels}; {bw.array_bytes >> 20} MiB arrays), {bw.source}"
    if bw.load.contended:
        row += "\n  warning: probed under load, so MBU against it reads high: rerun with --reprobe on a quiet machine"
    return row


def _bandwidths(devices: list[str], reprobe: bool) -> dict[str, dict]:
    """Each device's probed bandwidth (profiling.bandwidth), cached or probed now."""
    from profiling.bandwidth import device_bandwidth

    return {d: device_bandwidth(d, reprobe=reprobe).to_dict() for d in devices}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reprobe",
        action="store_true",
        help="measure this CPU's peaks and the memory bandwidths again now (takes seconds)",
    )
    p.add_argument("--no-bandwidth", action="store_true", help="leave the memory bandwidth probe out")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    import torch

    from profiling.bandwidth import Bandwidth
    from profiling.cpu import cache_path, cpu_name, cpu_peak_entry
    from profiling.hardware import accelerator

    entry = cpu_peak_entry(reprobe=args.reprobe)
    out = {"cpu": {"name": cpu_name(), "threads": torch.get_num_threads(), "cache": str(cache_path()), **entry}}
    if torch.cuda.is_available():
        out["cuda"] = []
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            out["cuda"].append({"name": name, "tflops": accelerator(name).tflops, "source": "data sheet, dense"})
    if not args.no_bandwidth:
        devices = ["cpu"] + [f"cuda:{i}" for i in range(len(out.get("cuda", [])))]
        out["bandwidth"] = _bandwidths(devices, args.reprobe)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"this CPU: {out['cpu']['name']}   cache {out['cpu']['cache']}")
    print("\n".join(_cpu_rows(entry)))
    bandwidth = {d: Bandwidth.from_dict(b) for d, b in out.get("bandwidth", {}).items()}
    if "cpu" in bandwidth:
        print(_bandwidth_row(bandwidth["cpu"]))
    for i, gpu in enumerate(out.get("cuda", [])):
        dense = ", ".join(f"{k} {v:g}" for k, v in gpu["tflops"].items())
        print(f"{gpu['name']}: dense TFLOP/s from the data sheet: {dense}")
        if f"cuda:{i}" in bandwidth:
            print(_bandwidth_row(bandwidth[f"cuda:{i}"]))
    return 0
