"""Linear layers whose weights are prepacked for oneDNN on the CPU.

A decode step multiplies a few rows by every weight matrix, and on a CPU that is limited by
how the weight is laid out in memory more than by arithmetic: oneDNN's matmul on a weight
reordered once into its blocked format is 1.5-2.3x faster than `F.linear` at 1-16 rows
(SmolLM2's 30 layers and lm-head, 2-core EPYC, fp32; equal at 512 rows), which is how vLLM's
CPU backend runs its linears too. `pack_linears` does the reordering after the weights load
and releases each dense copy it replaces, so memory does not double: the weight keeps its
shape (a zero-stride placeholder) for the parameter counts that read it. A weight shared with
the embedding (tied lm-head) is kept: the embedding still looks tokens up in it.

On CUDA nothing is packed: `Linear` is `nn.Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 32  # rows oneDNN tunes the packed layout for (decode-sized, as vLLM's CPU backend)
# fp32 only: oneDNN packs bf16 only on CPUs with AVX512-BF16 / AVX-NE-CONVERT, and on those
# (../shared/notes/cpu-machines.md) bf16 through F.linear is what has been measured
PACKABLE_DTYPES = (torch.float32,)


class Linear(nn.Linear):
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout (an opaque CPU tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def pack(self, release: bool) -> None:
        """Reorder the weight for oneDNN; with `release`, free the dense copy (shape kept)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), BATCH_HINT)
        if release:
            placeholder = self.weight.new_zeros(()).expand(self.weight.shape)
            self.weight = nn.Parameter(placeholder, requires_grad=self.weight.requires_grad)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module, keep: frozenset[int] = frozenset()) -> None:
    """Pack every `Linear` of `model`; weights whose id() is in `keep` stay dense too."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack(release=id(module.weight) not in keep)
