"""Linear layers whose weights are laid out for the CPU's fastest matmul.

A decode step multiplies a few rows by every weight matrix, and on a CPU that is limited by
the weights' bytes and layout in memory more than by arithmetic. Two layouts, chosen at load
(serve.models.load_model), each replacing the dense weight:

- packed (float32 weights, or bfloat16 on CPUs with bf16 instructions): oneDNN's matmul on a
  weight reordered once into its blocked format, 1.5-2.3x faster than `F.linear` at 1-16 rows in
  float32 (SmolLM2's 30 layers and lm-head, 2-core EPYC; equal at 512 rows), 1.4-1.8x in bf16,
  which is how vLLM's CPU backend runs its linears too;
- pairs (bfloat16 on CPUs with AVX-512 BF16, beside the packed copy): serve.kernels'
  `linear_bf16` on vdpbf16ps, 1.4x / 1.27x / 1.1x faster than packed oneDNN at 1 / 16 / 64 rows
  (SmolLM2's layers, 2-core AVX-512 EPYC, medians of 7), 0.92x at 512: rows up to
  PAIRS_MAX_ROWS take it, prefill-sized batches keep oneDNN. Both copies are kept: twice the
  weights' bytes in memory, for decode steps that stream each weight once at ~25 GB/s;
- half (float32 math, float16 storage; `half_weights` in serve.config): half the bytes to
  stream, widened in registers by serve.kernels' `linear_half_weight`, 1.3-1.7x faster than
  packed float32 at 1-16 rows; prefill-sized batches widen the weight and run `F.linear`.
  Weights are rounded to float16 (relative error 2^-11), the only numerical change.

The dense copy is released, so memory does not grow (but for the pairs' second copy): the weight keeps its shape (a
zero-stride placeholder) for the parameter counts that read it. A weight shared with the
embedding (tied lm-head) is kept: the embedding still looks tokens up in it.

On CUDA nothing is changed: `Linear` is `nn.Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve.kernels import op

BATCH_HINT = 32  # rows oneDNN tunes the packed layout for (decode-sized, as vLLM's CPU backend)
HALF_KERNEL_MAX_ROWS = 256  # above: widen the weight and use F.linear (as fast at 512 rows, measured)
PAIRS_MAX_ROWS = 128  # above: oneDNN's packed bf16 (faster at 512 rows, the pairs kernel up to 128)


class Linear(nn.Linear):
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout (an opaque CPU tensor)
    half: torch.Tensor | None = None  # the weight stored in float16, float32 math
    pairs: torch.Tensor | None = None  # the bf16 weight in pairs for vdpbf16ps (pack_pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairs is not None and x.shape[0] <= PAIRS_MAX_ROWS:
            return op("linear_bf16")(x, self.pairs, self.out_features, self.bias)
        if self.half is not None:
            if x.shape[0] <= HALF_KERNEL_MAX_ROWS:
                return op("linear_half_weight")(x, self.half, self.bias)
            return F.linear(x, self.half.float(), self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def stored_weight(self) -> torch.Tensor:
        """The weight as a forward reads it: the float16 copy, else `weight` (under a packed
        layout, its same-sized placeholder: numel and element size still tell the bytes)."""
        return self.half if self.half is not None else self.weight

    def pack(self, release: bool) -> None:
        """Reorder the weight for oneDNN, or in bf16 pairs where `can_pack_pairs`; with `release`,
        free the dense copy (shape kept)."""
        if self.in_features % 2 == 0 and can_pack_pairs(self.weight.device, self.weight.dtype):
            self.pairs = pack_pairs(self.weight.detach())
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), BATCH_HINT)
        if release:
            self._release()

    def store_half(self, release: bool) -> None:
        """Keep the weight in float16 for the half-weight kernel; with `release`, free the dense copy."""
        self.half = self.weight.detach().half().contiguous()
        if release:
            self._release()

    def _release(self) -> None:
        placeholder = self.weight.new_zeros(()).expand(self.weight.shape)
        self.weight = nn.Parameter(placeholder, requires_grad=self.weight.requires_grad)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """float32 always; bfloat16 where oneDNN has bf16 kernels (AVX512-BF16, AMX): there the packed
    layout is 1.8x / 1.4x faster than `F.linear` at 1 / 16 rows over SmolLM2's layers (AVX-512
    EPYC, measured), as fast at 512."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack_pairs(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 on a CPU with AVX-512 BF16 and the C++ kernels: serve.kernels' `linear_bf16`."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and op("linear_bf16") is not None
        and torch.ops.ministack.bf16_linear_supported()
    )


def pack_pairs(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) bfloat16, K even -> (blocks, K / 2, 16) int32, `linear_bf16`'s layout: block b, pair
    p, lane j holds (w[16b + j, 2p], w[16b + j, 2p + 1]); N padded with zero rows to whole
    groups of 48 outputs. Raises ValueError for an odd K (the input's pairs would straddle rows)."""
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"pack_pairs needs an even number of input features, not {k}")
    padded = F.pad(weight, (0, 0, 0, -n % 48))
    return padded.view(torch.int32).view(-1, 16, k // 2).transpose(1, 2).contiguous()


def can_store_half(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and op("linear_half_weight") is not None


def layout_linears(model: nn.Module, half: bool, keep: frozenset[int] = frozenset()) -> None:
    """Pack every `Linear` of `model` for oneDNN, or store it in float16 (`half`); weights whose
    id() is in `keep` stay dense too."""
    for module in model.modules():
        if isinstance(module, Linear):
            (module.store_half if half else module.pack)(release=id(module.weight) not in keep)
