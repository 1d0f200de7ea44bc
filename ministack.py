"""The `ministack` command: a thin dispatcher to each package's own CLI.

Every subcommand lives in the package that owns the concept (`ministack train ...` is
`python -m train ...`; `ministack flops ...`, which counts the DiT, is `python -m model.flops ...`),
so each feature is equally usable from Python or the shell.
Packages are imported lazily: `ministack flops estimate` never pays for importing diffusers.
For the commands that train or sample, OpenMP's wait policy is set here, before anything imports
torch (profiling.threads.configure_openmp: the runtime reads it once, when torch loads it).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("model.flops.cli", "compute accounting: count, estimate, report, demo"),
    "train": ("train.cli", "train the DiT (accelerate + DeepSpeed) under the FLOPs profiler"),
    "sample": ("model.sample", "text/image/video -> video with a trained pipeline: mp4, gif, PNG grid"),
    "scaling": ("scaling.cli", "isoFLOP sweeps of the DiT; scaling-law fits under every way of counting compute"),
    "serve": ("serve.cli", "OpenAI-compatible text inference server (own engine or vLLM); needle harness"),
}
OPENMP_COMMANDS = ("train", "sample", "scaling")  # their CPU work runs on torch's OpenMP team


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: ministack COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nministack: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] in OPENMP_COMMANDS:
        from profiling.threads import configure_openmp  # imports no torch

        configure_openmp()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
