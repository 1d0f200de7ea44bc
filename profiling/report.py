"""Validate measured FLOPs in ledgers against 6ND / 2NT and attribute the gap by part.

Prints, per kind (train / infer): totals and the measured/law ratio; one row per input
shape (where the ratio moves with context length); and the gap split into parts, each with
the reason it departs from the law. Writes a PNG: the ratio per shape and what share of the
measured FLOPs each part takes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from profiling.bandwidth import cached_bandwidth, format_bandwidth, mbu
from profiling.hardware import format_rate
from profiling.inputs import parse_number
from profiling.laws import law_multiplier
from profiling.ledger import Record, read_ledgers
from profiling.parts import ATTENTION, LAW_PARTS, PARTS, WHY, WHY_INFER


@dataclass
class Group:
    """Totals over a set of records of one kind (optionally one shape)."""

    kind: str
    shape: str = ""
    records: int = 0
    units: set = field(default_factory=set)  # optimizer steps (train: all ranks' records of one step) or requests
    ranks: int = 1  # the most data-parallel ranks any record was shared with
    devices: set = field(default_factory=set)  # the devices its records ran on
    peaks: dict[tuple[float, str], int] = field(default_factory=lambda: defaultdict(int))  # (FLOP/s, source) -> records
    tokens: int = 0
    measured: float = 0.0
    law: float = 0.0
    wall_s: float = 0.0
    peak_s: float = 0.0  # sum of wall_s * peak, for a time-weighted MFU
    measured_by_part: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    law_by_part: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes_by_part: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # bytes moved (serving records)

    def add(self, r: Record) -> None:
        self.records += 1
        self.units.add((r.run, r.step) if r.kind == "train" and r.step is not None else id(r))
        self.ranks = max(self.ranks, r.world_size or 1)
        self.devices.add(r.device)
        self.peaks[(r.peak_flops, r.peak_source)] += 1
        self.tokens += r.tokens
        self.measured += r.measured_flops
        self.law += r.law_flops
        self.wall_s += r.wall_s
        self.peak_s += r.wall_s * r.peak_flops
        for part, n in r.parts.items():
            self.measured_by_part[part] += n
        for part, n in r.bytes_parts.items():
            self.bytes_by_part[part] += n
        k = law_multiplier(r.kind)
        for part, n in r.params.items():
            if part in LAW_PARTS:
                self.law_by_part[part] += k * n * r.tokens

    @property
    def unit(self) -> str:
        return "step" if self.kind == "train" else "request"

    @property
    def n(self) -> int:
        """Optimizer steps (summed over ranks) or requests."""
        return len(self.units)

    @property
    def ratio(self) -> float:
        return self.measured / self.law if self.law else math.nan

    @property
    def mfu(self) -> float:
        return self.measured / self.peak_s if self.peak_s else math.nan

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_part.values())

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: measured FLOPs per byte moved (nan where no bytes were recorded)."""
        return self.measured / self.bytes if self.bytes else math.nan

    def bound(self, bandwidth: float | None) -> str:
        """'compute' or 'bandwidth': the roofline side of the group's intensity against the machine's
        balance (its time-weighted peak FLOP/s over `bandwidth` bytes/s); '' where either is unknown."""
        if not bandwidth or not self.bytes or not self.peak_s or not self.wall_s:
            return ""
        return "compute" if self.intensity >= self.peak_s / self.wall_s / bandwidth else "bandwidth"

    def mbu(self, bandwidth: float | None) -> float:
        """Model bandwidth utilisation: the bytes moved over the records' wall time, against
        `bandwidth` bytes/s (nan where either is unknown). Like the MFU beside it, concurrent
        requests' wall times add up, so a busy server's MBU reads low."""
        return mbu(self.bytes, self.wall_s, bandwidth or 0.0) if self.bytes else math.nan

    def share(self, part: str) -> float:
        return self.measured_by_part.get(part, 0.0) / self.measured if self.measured else 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "shape": self.shape,
            "records": self.records,
            f"{self.unit}s": self.n,
            "ranks": self.ranks,
            "tokens": self.tokens,
            "measured_flops": self.measured,
            "law_flops": self.law,
            "ratio": self.ratio,
            "mfu": self.mfu,
            "bytes_moved": self.bytes,
            "bytes_by_part": dict(self.bytes_by_part),
            "flops_per_byte": self.intensity,
            "peaks": [{"flops": f, "source": s, "records": n} for (f, s), n in self.peaks.items()],
            "parts": {
                p: {"measured": self.measured_by_part.get(p, 0.0), "law": self.law_by_part.get(p, 0.0)}
                for p in PARTS
                if self.measured_by_part.get(p) or self.law_by_part.get(p)
            },
        }


def summarize(
    records: list[Record], peak_flops: float | None = None
) -> tuple[dict[str, Group], dict[str, list[Group]]]:
    """Totals per kind, and per (kind, shape) ordered by tokens per step or request.

    `peak_flops` re-derives every MFU against that peak instead of the one each record kept (a
    corrected peak); ValueError if a record achieved more than it (then it is no peak).
    """
    if peak_flops is not None:
        fastest = max(records, key=lambda r: r.flops_per_s)
        if fastest.flops_per_s > peak_flops:
            which = f"step {fastest.step}" if fastest.step is not None else f"request {fastest.request_id}"
            raise ValueError(
                f"--peak-flops {format_rate(peak_flops)} is below what a record achieved "
                f"({format_rate(fastest.flops_per_s)}, {fastest.kind} {which}): not a peak"
            )
        records = [replace(r, peak_flops=peak_flops, peak_source="--peak-flops") for r in records]
    kinds: dict[str, Group] = {}
    shapes: dict[tuple[str, str], Group] = {}
    for r in records:
        kinds.setdefault(r.kind, Group(r.kind)).add(r)
        shapes.setdefault((r.kind, r.shape), Group(r.kind, r.shape)).add(r)
    by_kind: dict[str, list[Group]] = defaultdict(list)
    for (kind, _), g in shapes.items():
        by_kind[kind].append(g)
    for groups in by_kind.values():
        groups.sort(key=lambda g: g.tokens / g.n)
    return kinds, dict(by_kind)


def _e(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3e}"


def _peaks(g: Group) -> str:
    """The peak(s) the MFU was computed against, with where each came from: all of them when
    there are one or two, else the lowest and the highest (a run whose stale peak was raised
    step after step)."""
    peaks = sorted(((f, src, n) for (f, src), n in g.peaks.items() if f > 0), key=lambda p: p[0])
    if not peaks:
        return "peak unknown"

    def one(p: tuple[float, str, int]) -> str:
        count = f"; {p[2]} record{'s' if p[2] != 1 else ''}" if len(peaks) > 1 else ""
        return f"{format_rate(p[0])} ({p[1] or 'source not recorded'}{count})"

    if len(peaks) <= 2:
        return "peak " + "; ".join(map(one, peaks))
    return f"peaks from {one(peaks[0])} to {one(peaks[-1])}, {len(peaks) - 2} more between"


def _traffic(g: Group, bandwidth: float | None, source: str) -> str:
    """The group's bytes moved by part, its FLOPs per byte, and (given the bandwidth) its MBU and
    roofline side, with where the bandwidth came from."""
    parts = ", ".join(f"{part} {n / g.bytes:.0%}" for part, n in sorted(g.bytes_by_part.items(), key=lambda kv: -kv[1]))
    line = f"bytes moved {_e(float(g.bytes))} ({parts}); {g.intensity:.1f} FLOPs per byte"
    if not bandwidth:
        return (
            line
            + (f" ({source}; " if source else " (")
            + "--bandwidth BYTES/S gives MBU and whether that is compute- or bandwidth-bound)"
        )
    balance = g.peak_s / g.wall_s / bandwidth if g.wall_s and g.peak_s else math.nan
    return (
        line + f"; machine balance {balance:.1f} FLOPs per byte: {g.bound(bandwidth) or 'unknown'}-bound\n"
        f"MBU {g.mbu(bandwidth):.1%} ({format_bandwidth(g.bytes / g.wall_s)} moved, modelled) against "
        f"{format_bandwidth(bandwidth)} ({source or 'source not given'})"
    )


def resolve_bandwidth(given: float | None, records: list[Record]) -> tuple[float | None, str]:
    """The bandwidth MBU is computed against and where it came from: `--bandwidth` where given,
    else the cached probe (profiling.bandwidth) of the device the records moved their bytes on;
    (None, why not) where there is neither. Probes nothing: a report reads, it does not measure."""
    if given:
        return given, "--bandwidth"
    devices = {r.device for r in records if r.bytes_parts}
    if len(devices) != 1:
        return None, "records from several devices" if devices else ""
    device = devices.pop()
    bw = cached_bandwidth(device)
    if bw is None:
        return None, f"no probed bandwidth of {device}: `ministack flops peak` on it probes one"
    return bw.bytes_per_s, f"{bw.source}, {device}"


def format_report(
    kinds: dict[str, Group],
    shapes: dict[str, list[Group]],
    skipped: int,
    bandwidth: float | None = None,
    bandwidth_source: str = "",
) -> str:
    law_name = {"train": "6ND", "infer": "2NT"}
    out = []
    for kind, g in kinds.items():
        ranks = f" = {g.n} optimizer steps x {g.ranks} ranks" if g.ranks > 1 else ""
        totals = " (all ranks)" if g.ranks > 1 else ""
        out.append(
            f"== {kind}: {g.records} records{ranks}, {g.tokens} tokens{totals}, law {law_name.get(kind, '?')} =="
        )
        mfu = "-" if math.isnan(g.mfu) else f"{g.mfu:.1%}"
        out.append(f"measured {_e(g.measured)} FLOPs   law {_e(g.law)}   measured/law {g.ratio:.3f}   MFU {mfu}")
        out.append(f"MFU against {_peaks(g)}")
        if g.bytes:
            out.append(_traffic(g, bandwidth, bandwidth_source))
        out.append("")
        unit = g.unit
        width = max([34] + [len(s.shape) for s in shapes[kind]])  # shape labels are never cut
        traffic = f" {'FLOP/B':>7}" + (f" {'MBU':>6} {'bound':>9}" if bandwidth else "") if g.bytes else ""
        out.append(
            f"{'shape':<{width}} {unit + 's':>8} {'tokens/' + unit:>14} {'measured/' + unit:>16} "
            f"{'law/' + unit:>12} {'ratio':>7} {'attn':>6}{traffic}"
        )
        for s in shapes[kind]:
            traffic = (
                f" {s.intensity:>7.1f}" + (f" {s.mbu(bandwidth):>6.1%} {s.bound(bandwidth):>9}" if bandwidth else "")
                if g.bytes
                else ""
            )
            out.append(
                f"{s.shape:<{width}} {s.n:>8} {s.tokens / s.n:>14.0f} {_e(s.measured / s.n):>16} "
                f"{_e(s.law / s.n):>12} {s.ratio:>7.3f} {s.share(ATTENTION):>6.1%}{traffic}"
            )
        out.append("")
        out.append("gap by part (measured/law = 1 + the sum of the gap/law column):")
        out.append(f"{'part':<11} {'law':>11} {'measured':>11} {'gap':>11} {'gap/law':>8}  why")
        for part in PARTS:
            law, meas = g.law_by_part.get(part, 0.0), g.measured_by_part.get(part, 0.0)
            if not law and not meas:
                continue
            rel = (meas - law) / g.law if g.law else math.nan
            why = (WHY_INFER if kind == "infer" else WHY)[part]
            out.append(f"{part:<11} {_e(law):>11} {_e(meas):>11} {meas - law:>+11.3e} {rel:>+8.1%}  {why}")
        out.append("")
    if skipped:
        out.append(f"skipped {skipped} unreadable ledger line(s)")
    return "\n".join(out)


def plot(shapes: dict[str, list[Group]], path: str | Path) -> Path:
    """Two panels per kind: measured/law by shape, and the measured FLOPs' split by part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(shapes)
    fig, axes = plt.subplots(len(kinds), 2, figsize=(13, 4.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        groups = shapes[kind]
        labels = [g.shape for g in groups]
        x = range(len(groups))
        row[0].bar(x, [g.ratio for g in groups], color="#4C72B0")
        row[0].axhline(1.0, color="black", lw=1, ls="--", label="law (ratio 1)")
        row[0].set_title(f"{kind}: measured / {'6ND' if kind == 'train' else '2NT'} by shape")
        row[0].set_ylabel("measured / law")
        row[0].legend()
        bottom = [0.0] * len(groups)
        for part in PARTS:
            shares = [g.share(part) for g in groups]
            if any(shares):
                row[1].bar(x, shares, bottom=bottom, label=part)
                bottom = [b + s for b, s in zip(bottom, shares)]
        row[1].set_title(f"{kind}: share of measured FLOPs by part")
        row[1].legend(fontsize=8)
        for ax in row:
            ax.set_xticks(list(x))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ledgers", nargs="+", help="ledger JSONL files")
    p.add_argument("--plot", help="PNG path (default: the first ledger's name with .png)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--peak-flops",
        type=parse_number,
        metavar="FLOP/S",
        help="re-derive every MFU against this peak (e.g. a corrected one from `flops peak`) "
        "instead of the peak each record kept",
    )
    p.add_argument(
        "--bandwidth",
        type=parse_number,
        metavar="BYTES/S",
        help="the device's memory bandwidth, for MBU and, with the peak, whether each shape's steps were "
        "compute- or bandwidth-bound (serving records carry the bytes they moved); default: the "
        "records' device's probe cached by `ministack flops peak`",
    )


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.ledgers if not Path(p).is_file()]
    if missing:
        raise ValueError(f"no such ledger: {', '.join(missing)}")
    data = read_ledgers(args.ledgers)
    if not data.records:
        raise ValueError(f"no valid records in {', '.join(args.ledgers)} ({data.skipped} unreadable lines)")
    kinds, shapes = summarize(data.records, args.peak_flops)
    bandwidth, source = resolve_bandwidth(args.bandwidth, data.records)
    png = plot(shapes, args.plot or Path(args.ledgers[0]).with_suffix(".png"))
    if args.json:

        def traffic(g: Group) -> dict:
            return g.to_dict() | {"bound": g.bound(bandwidth), "mbu": g.mbu(bandwidth)}

        print(
            json.dumps(
                {
                    "kinds": {k: traffic(g) for k, g in kinds.items()},
                    "shapes": {k: [traffic(g) for g in gs] for k, gs in shapes.items()},
                    "bandwidth": {"bytes_per_s": bandwidth, "source": source},
                    "skipped": data.skipped,
                    "plot": str(png),
                },
                indent=1,
            )
        )
    else:
        print(format_report(kinds, shapes, data.skipped, bandwidth, source))
        print(f"plot: {png}")
    return 0
