"""The engine's C++ kernels, compiled on first use and cached; the engine runs without them.

`paged_decode_attention()` returns `torch.ops.ministack.paged_decode_attention` (decode
attention read in place from the paged KV cache on the CPU: paged_attention.cpp), building it
the first time with torch.utils.cpp_extension (about a minute on 2 cores; later processes load
the cached library in well under a second). Where it cannot be built (no C++ compiler, no
ninja) it returns None, says why once, and the engine falls back to gathering contexts for
SDPA (serve.layers.attention), which gives the same results more slowly.

The library is built for the CPU it runs on (-march from torch's detected capability) and its
cache name carries that capability, so a home directory shared by machines of different CPU
kinds never hands one a library with instructions it lacks.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from profiling.measure import attention_flops, register_attention_kernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# the vector ISA to compile for, from the capability torch itself dispatches on
ISA_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mf16c"], "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
DISABLE_ENV = "MINISTACK_NO_KERNELS"  # set to 1: never build or load them (the torch fallback runs)


@functools.cache
def paged_decode_attention() -> Callable | None:
    """The compiled op, or None (with the reason logged) where it cannot be had."""
    if os.environ.get(DISABLE_ENV) == "1":
        log.info("%s=1: decode attention gathers contexts in torch", DISABLE_ENV)
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the paged decode attention kernel (compiled on first use, ~15 s)")
        load(
            name=f"ministack_kernels_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *ISA_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: run without the kernel
        log.warning("paged decode attention kernel unavailable (%s: %s); decode attention gathers contexts in torch", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    op = torch.ops.ministack.paged_decode_attention
    register_attention_kernel(op, _decode_flops)
    return op


def _decode_flops(query: torch.Tensor, kv_cache, block_tables, context_lens: torch.Tensor, block_size, scale, out_val=None) -> int:
    """What the kernel computes: each sequence's one query per head over its own context, no
    padding (QK^T and AV, 2 FLOPs per multiply-add, as `profiling.measure` counts SDPA)."""
    heads, head_dim = query.shape[1], query.shape[2]
    return attention_flops(1, heads, 1, int(context_lens.sum()), head_dim, head_dim, causal=False)
