"""`ministack flops {count,estimate,report,peak,demo}` (also `python -m model.flops ...`).

Each subcommand's flags and output live beside its logic (model.flops.count and .demo, which
build the DiT; profiling.estimate, .report and .peak, which know no model); this file only wires
them together. It sits here, above profiling, because counting a DiT preset needs the model:
profiling imports nothing from the packages it accounts for.
"""

from __future__ import annotations

import argparse
import sys

from model.flops import count, demo
from profiling import estimate, peak, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ministack flops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in (("count", count), ("estimate", estimate), ("report", report), ("peak", peak), ("demo", demo)):
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"ministack flops {args.command}: error: {err}", file=sys.stderr)
        return 2
