"""The engine's C++ kernels for the CPU, compiled on first use and cached; the engine runs without them.

Ops of one library, `torch.ops.ministack`, each fetched with `op(name)`:
- `paged_decode_attention` (paged_attention.cpp): decode attention read in place from the
  paged KV cache;
- `store_kv` (kv_store.cpp): a step's new K/V written into the paged cache at their slots, in
  the cache's dtype (int8: codes and their scales), one pass for both planes;
- `prefill_attention` (prefill_attention.cpp): a bfloat16 chunk's causal attention over its cached
  past and its own keys on AVX-512 BF16 instructions, where `prefill_attention_supported()`
  (else torch's SDPA);
- `linear_half_weight` (half_linear.cpp): a float32 linear layer whose weight is stored in
  float16, half the bytes a decode step streams;
- `linear_bf16` (bf16_linear.cpp): a bfloat16 linear layer on AVX-512 BF16 instructions over a
  weight laid out in pairs at load, for decode-sized batches, where `bf16_linear_supported()`;
- `rms_norm`, `add_rms_norm` (the residual add fused in), `rotary`, `silu_and_mul`
  (elementwise.cpp): the per-layer small ops in one pass each (float32, bfloat16, float16);
- `argmax_rows` (elementwise.cpp): each row's argmax of float32 logits, as torch.argmax picks it
  (the greedy sampler's).

`load()` builds the library the first time with torch.utils.cpp_extension (~15-30 s on 2 cores;
later processes load the cached library in well under a second) and registers each op's FLOPs
with profiling.measure. Where it cannot be built (no C++ compiler, no ninja) it returns False,
says why once, and the engine falls back to plain torch: decodes gather their contexts for
SDPA (serve.layers.attention), weights stay float32 (serve.layers.linear), norms and RoPE
run as ATen ops.

The library is built for the CPU it runs on (vector ISA flags from torch's detected
capability) and its cache name carries that capability, so a home directory shared by
machines of different CPU kinds never hands one a library with instructions it lacks. The
name also carries a hash of every source and header (torch's own check sees only the .cpp
files), so an edited kernel is always rebuilt, and of the sources' folder: two checkouts of the
same code would otherwise share one build folder and rebuild it in turn (torch's build file names
the source paths).

torch serializes builds with a lock file that a process killed mid-build leaves behind, and
every later process then waits on it forever, silently. `load` waits for a live build itself,
saying so, and removes a lock older than STALE_BUILD_S (a build takes well under a minute or two).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from profiling.measure import attention_flops, register_kernel

log = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "paged_attention.cpp",
        "prefill_attention.cpp",
        "kv_store.cpp",
        "half_linear.cpp",
        "bf16_linear.cpp",
        "elementwise.cpp",
    )
]
HEADERS = [Path(__file__).with_name(name) for name in ("vec.h", "avx512_bf16.h")]
# the vector ISA to compile for, from the capability torch itself dispatches on
ISA_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mf16c"], "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
DISABLE_ENV = "MINISTACK_NO_KERNELS"  # set to 1: never build or load them (the torch fallbacks run)
STALE_BUILD_S = 300.0


@functools.cache
def load() -> bool:
    """Build (once) and load the kernels; False, with the reason logged, where they cannot be had."""
    if os.environ.get(DISABLE_ENV) == "1":
        log.info("%s=1: no C++ kernels, the torch fallbacks run", DISABLE_ENV)
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"ministack_kernels_{capability.lower()}_{_content_hash()}"
    if not _built(name):
        print(f"building the C++ kernels for this CPU ({capability}), once: ~15-30 s", flush=True)
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as build

        _await_other_build(Path(_get_build_directory(name, verbose=False)) / "lock")

        build(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *ISA_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: run without the kernels
        first = str(e).splitlines()[0] if str(e) else ""
        log.warning("C++ kernels unavailable (%s: %s); the torch fallbacks run", type(e).__name__, first)
        return False
    register_kernel(torch.ops.ministack.paged_decode_attention, _decode_flops, attention=True)
    register_kernel(torch.ops.ministack.prefill_attention, _prefill_flops, attention=True)
    register_kernel(torch.ops.ministack.linear_half_weight, _linear_flops, attention=False)
    register_kernel(torch.ops.ministack.linear_bf16, _pairs_linear_flops, attention=False)
    return True


def _await_other_build(lock: Path) -> None:
    """Wait while another process builds (its lock file is fresh); remove a lock that has gone
    stale, left by a process killed mid-build (module docstring)."""
    said = False
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_BUILD_S:
            log.warning("removing %s: a build lock %.0f s old, left by a process that died mid-build", lock, age)
            lock.unlink(missing_ok=True)
            return
        if not said:
            print(
                f"waiting for another process building the C++ kernels (lock {lock}; taken as stale after "
                f"{STALE_BUILD_S:.0f} s)",
                flush=True,
            )
            said = True
        time.sleep(1.0)


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds the library (only to say a build is coming)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: any failure means "unknown"

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001
        return True


def _content_hash() -> str:
    digest = hashlib.sha1(str(Path(__file__).parent.resolve()).encode())  # one build folder per checkout
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def op(name: str) -> Callable | None:
    """torch.ops.ministack.`name`, or None where the kernels cannot be had."""
    return getattr(torch.ops.ministack, name) if load() else None


def _decode_flops(
    query: torch.Tensor,
    kv_cache,
    block_tables,
    context_lens: torch.Tensor,
    block_size,
    scale,
    window=0,
    kv_scale=None,
    out_val=None,
) -> int:
    """What the attention kernel computes: each sequence's one query per head over its own
    context (its last `window` tokens under a sliding window), no padding (QK^T and AV, 2 FLOPs
    per multiply-add, as `profiling.measure` counts SDPA)."""
    heads, head_dim = query.shape[1], query.shape[2]
    keys = int(context_lens.clamp(max=window).sum()) if window else int(context_lens.sum())
    return attention_flops(1, heads, 1, keys, head_dim, head_dim, causal=False)


def _prefill_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, out_val=None) -> int:
    """A chunk's causal attention over its own keys plus every pair with its cached past (the
    keys before it), as `profiling.measure` counts the two SDPA calls this replaces."""
    n, past = q.shape[0], k.shape[0] - q.shape[0]
    return attention_flops(1, q.shape[1], n, n, q.shape[2], v.shape[2], causal=True) + attention_flops(
        1, q.shape[1], n, past, q.shape[2], v.shape[2], causal=False
    )


def _linear_flops(input: torch.Tensor, weight: torch.Tensor, bias, out_val=None) -> int:
    """2 x rows x in x out, as torch counts addmm/mm."""
    return 2 * input.numel() * weight.shape[0]


def _pairs_linear_flops(input: torch.Tensor, packed: torch.Tensor, out_features: int, bias, out_val=None) -> int:
    """2 x rows x in x out, the real outputs (not the packed weight's padding)."""
    return 2 * input.numel() * out_features
