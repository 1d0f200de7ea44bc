"""Console lines from libraries that say nothing about the run, silenced where they are emitted.

DeepSpeed picks its accelerator the first time it is imported, and accelerate imports it in every
run where it is installed (its `unwrap_model`, which the EMA update calls each step, checks for a
DeepSpeedEngine), DeepSpeed in use or not. Finding neither CUDA nor another accelerator, it warns
on stdout through its "DeepSpeed" logger:

    [WARNING] [real_accelerator.py:...:get_accelerator] Setting accelerator to CPU. If you have GPU
    or other accelerator, we were unable to detect it.

On a single-process CPU run the CPU is the device the run chose, and its `peak:` line names it:
the warning only reads like a fault. It is dropped there by a filter on that logger, for that
message alone. Not `DS_ACCELERATOR=cpu`: an environment variable is inherited by every child
process and overrides DeepSpeed's detection (XPU, MPS, NPU ...), where a filter changes nothing
but one line. Runs of several processes keep it: there, a rank on a node whose GPUs were not
found is worth a line.
"""

from __future__ import annotations

import logging
import os

DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger: the same object before and after deepspeed's import
CPU_FALLBACK = "Setting accelerator to CPU."


class DropDeepSpeedCpuFallback(logging.Filter):
    """Drops DeepSpeed's warning that it fell back to the CPU; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).startswith(CPU_FALLBACK))


def quiet_deepspeed_on_cpu() -> bool:
    """In a single-process run without CUDA, silence DeepSpeed's CPU-fallback warning (before
    deepspeed is imported, so the filter is in place when it is said); True where it did. Its
    errors, and its other warnings, still show."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.cuda.is_available():
        return False
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, DropDeepSpeedCpuFallback) for f in logger.filters):
        logger.addFilter(DropDeepSpeedCpuFallback())
    return True
