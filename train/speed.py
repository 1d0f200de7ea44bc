"""How a training step runs fast on this device without changing what it computes.

- **AdamW, fused.** One kernel updates every parameter (torch >= 2.4, CPU and CUDA) instead of
  torch's per-parameter loop (its CPU default), which on a CPU costs several times the fused
  update for a model of DiT-S/2's size. Under DeepSpeed the engine's ZeRO optimizer wraps ours
  and steps flat partitions: there it stays torch's default.
- **torch.compile** (`compile: true`): inductor fuses the norms, modulations, GELUs and residual
  gates between the matmuls. On a CPU it generates C++, so it needs a compiler: checked before
  the run starts (`check_compile`), not at the first step. It pays on long runs only: the first
  step of each shape compiles for tens of seconds (`bench/dit_step.py` measures the saving per
  step and the break-even step).
"""

from __future__ import annotations

import shutil

import torch


def adamw(params, lr: float, weight_decay: float, deepspeed: bool = False) -> torch.optim.AdamW:
    """torch's AdamW, fused where the run's optimizer is torch's own (not under DeepSpeed)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({} if deepspeed else {"fused": True}))


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU ($CXX, else c++ / g++ / clang++ on PATH), or None."""
    import os

    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        if found := shutil.which(name):
            return found
    return None


def check_compile(device: torch.device | str) -> None:
    """Refuse `compile: true` on a CPU without a C++ compiler, before the run starts (inductor
    would fail at the first step, after the data and the models loaded)."""
    if torch.device(device).type == "cpu" and cpp_compiler() is None:
        raise ValueError(
            "compile: true on a CPU needs a C++ compiler (inductor generates C++): none found "
            "($CXX, c++, g++, clang++); install one (e.g. apt-get install g++) or set compile: false"
        )
