"""Attention over a paged KV cache: the C++ kernel for decodes on the CPU, plain torch elsewhere.

A step's tokens arrive flattened: first one token per decoding sequence, then the chunks of
the sequences being prefilled. Every layer writes the new K/V into the cache at each token's
slot (`slot_mapping`, one index_copy_), then attends:

- decodes on the CPU: one call of the paged decode kernel (serve.kernels), which walks each
  sequence's block table and reads its context where it lies, exactly its own length.
- decodes elsewhere (CUDA, or a CPU without the kernel), in groups of similar context length:
  each group's contexts are gathered from their blocks into one padded (group, kv_heads,
  longest, head_dim) tensor and run through one SDPA call with an additive mask hiding the
  padding. Gathering costs a copy, but one kernel call per group beats a Python loop of small
  ones; grouping by length (serve.engine.model_runner) keeps the padding, which is copied and
  computed too, small.
- prefill chunks, each on its own. In bf16 on a CPU with AVX-512 BF16 (a chunk with a past: no
  sliding window): one call of serve.kernels' prefill kernel over its cached past and fresh K/V,
  causal, each K/V head read once for the query heads sharing it. Elsewhere SDPA: causal
  attention over the chunk's fresh K/V, and for a
  chunk after a cached prefix (earlier chunks or a prefix-cache hit) a second, unmasked call
  over the cached keys, the two merged by their log-sum-exps (query at position p sees keys
  0..p, and no masked pair is computed).

Sliding-window layers (Mistral; Qwen2's `sliding_attention` layers) let position p see keys
p - window + 1..p, as transformers does: the kernel starts each context at its window; a
gathered decode masks the keys before it; a chunk's past call reads only the last window - 1
cached keys, with a band mask where the chunk's later queries have left some of them behind.
The engine keeps every chunk shorter than the window (serve.engine.llm_engine), so a chunk's
own causal call never needs the band.

The cache is head-major (kv_heads, slots, head_dim), so a head's context is one contiguous
run, and a context whose blocks are consecutive is passed as a slice and read in place.
Cached K/V are never repeated per query head: a call over them (a decode, a chunk's past)
passes the query heads that share a K/V head as that head's query rows (measured ~1.5x
faster at 8k context on CPU than SDPA's enable_gqa); only a chunk's own short K/V is
repeated. What each call computes is exactly what `profiling.measure` counts for it
(serve.engine.flops relies on that).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from serve.kernels import op


@dataclass
class PrefillChunk:
    start: int  # offset of the chunk's first token in the step's flattened tokens
    length: int  # new tokens (queries)
    past: int  # cached keys before the chunk
    past_slots: torch.Tensor | slice | None  # (1, past) slots of those keys, or a slice; None: no past


@dataclass
class DecodeGroup:
    start: int  # offset of the group's first token in the step's flattened tokens
    count: int  # single-token decodes, one per sequence
    slots: torch.Tensor | slice  # (count, longest) context slots, padded with slot 0
    lengths: torch.Tensor  # (count,) context lengths, the new token included
    mask: torch.Tensor | None = None  # (count, 1, 1, longest) additive mask of the padding; None: no padding


@dataclass
class PagedDecodes:
    """The step's decodes (its first `count` tokens) for the paged decode kernel."""

    count: int
    block_tables: torch.Tensor  # (count, max_blocks) int32, padded with block 0
    context_lens: torch.Tensor  # (count,) int32, the new token included
    block_size: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (tokens,) cache slot of each new token's K/V
    paged: PagedDecodes | None = None  # the step's first tokens, for the kernel ...
    decodes: list[DecodeGroup] = field(default_factory=list)  # ... or in gathered groups
    prefills: list[PrefillChunk] = field(default_factory=list)


@functools.cache
def prefill_kernel():
    """serve.kernels' bf16 causal prefill attention where this CPU has AVX-512 BF16, else None."""
    fused = op("prefill_attention")
    return fused if fused is not None and torch.ops.ministack.prefill_attention_supported() else None


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA (equal heads) that also returns each query's log-sum-exp of scores, (B, H, L) float32,
    which public SDPA hides: the fused kernel behind it, called directly (CPU flash / CUDA
    memory-efficient; both are attention kernels to profiling.measure). `mask`: additive."""
    if q.device.type == "cuda":
        bias = None
        if mask is not None:  # the kernel wants the bias's rows 16-aligned: padded, then sliced back (as SDPA does)
            keys = k.shape[2]
            bias = F.pad(mask.expand(q.shape[0], q.shape[1], q.shape[2], keys), (0, -keys % 16))[..., :keys]
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal)[:2]
        return out, lse[..., : q.shape[2]]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)[:2]
    return out, lse


class PagedAttention(nn.Module):
    """Stores this layer's new K/V in the paged cache and attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window = window  # sliding window: position p sees keys p - window + 1..p; None: all
        # (kv_heads, num_slots, head_dim) views into the engine's cache, set by the model runner:
        # head-major, so a head's context is one contiguous run, the layout SDPA reads fastest
        self.kv_cache = torch.empty(0)  # (2, kv_heads, num_slots, head_dim): K and V planes, read together
        self.kv_scale: torch.Tensor | None = None  # (2, kv_heads, num_slots) float32: an int8 cache's row scales

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (tokens, heads, head_dim), k/v (tokens, kv_heads, head_dim) -> (tokens, heads * head_dim)."""
        self._store(k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.paged is not None:
            p = meta.paged
            decoded = op("paged_decode_attention")(
                q[: p.count],
                self.kv_cache,
                p.block_tables,
                p.context_lens,
                p.block_size,
                self.head_dim**-0.5,
                self.window or 0,
                self.kv_scale,
            )
            if p.count == q.shape[0]:  # a step of decodes only: the kernel's output is the step's
                return decoded.flatten(1)
            out[: p.count] = decoded
        for group in meta.decodes:
            # one query per sequence: the query heads sharing a K/V head become that head's
            # query rows, a plain (non-GQA) call that reads each K/V head once
            rows, n = slice(group.start, group.start + group.count), group.count
            queries = q[rows].view(n, self.num_kv_heads, -1, self.head_dim)
            ctx_k, ctx_v = self._context(group.slots, n, q.dtype)
            o = F.scaled_dot_product_attention(
                queries, ctx_k, ctx_v, attn_mask=self._decode_mask(group, ctx_k.shape[2], q.dtype)
            )
            out[rows] = o.reshape(n, self.num_heads, self.head_dim)  # CUDA kernels may return it strided
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], chunk)
        return out.flatten(1)

    def _store(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write the step's K/V (tokens, kv_heads, head_dim) at their cache slots: in the cache's
        dtype, or for int8 as codes round(x / s) with one scale s = max|x| / 127 per token and
        head (symmetric; per-head rows keep one outlier head from coarsening the others). On
        the CPU one call of serve.kernels' `store_kv`, the same bytes as the torch below."""
        if k.is_cpu and (store := op("store_kv")) is not None:
            store(k, v, self.kv_cache, self.kv_scale, slots)
            return
        for plane, x in enumerate((k, v)):
            if self.kv_scale is None:
                self.kv_cache[plane].index_copy_(1, slots, x.transpose(0, 1).to(self.kv_cache.dtype))
                continue
            x = x.float()
            scale = x.abs().amax(-1).clamp_(min=1e-30) / 127
            self.kv_cache[plane].index_copy_(
                1, slots, torch.round(x / scale.unsqueeze(-1)).to(torch.int8).transpose(0, 1)
            )
            self.kv_scale[plane].index_copy_(1, slots, scale.transpose(0, 1))

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        """A chunk's attention, (length, heads, head_dim): causal over its own fresh K/V, and,
        after cached keys, also over those, the two halves merged by their log-sum-exps. A
        single call with a bottom-right mask would give the same, but reads a (length x context)
        mask per head (slower than the attention itself at 8k) and computes the masked pairs."""
        n, heads = q.shape[0], self.num_heads
        group = heads // self.num_kv_heads
        if (
            q.dtype == torch.bfloat16
            and q.is_cpu
            and self.head_dim in (64, 128)
            and (chunk.past_slots is None or self.window is None)
            and (fused := prefill_kernel()) is not None
        ):
            if chunk.past_slots is not None:  # one call over the past (gathered, dequantized) and the chunk's own keys
                past_k, past_v = (x[0].transpose(0, 1) for x in self._context(chunk.past_slots, 1, q.dtype))
                k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
            return fused(q, k, v, self.head_dim**-0.5)  # GQA-aware, ~2.4x torch's flash attention at 512 tokens
        # the chunk's own K/V repeated per query head: CUDA's fused kernels take no GQA (with
        # enable_gqa SDPA falls back to its math path, which computes the masked half too)
        qh = q.transpose(0, 1).unsqueeze(0)
        kh, vh = (x.transpose(0, 1).unsqueeze(0).repeat_interleave(group, 1) for x in (k, v))
        if chunk.past_slots is None:
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)[0].transpose(0, 1)
        o_new, lse_new = attention_with_lse(qh, kh, vh, causal=True)
        # over the past, the query heads sharing a K/V head are that head's rows: no repeat, no
        # mask (but a sliding window's band)
        rows = (
            q.view(n, self.num_kv_heads, group, self.head_dim)
            .permute(1, 2, 0, 3)
            .reshape(1, self.num_kv_heads, group * n, -1)
        )
        keys, slots = chunk.past, chunk.past_slots
        if self.window is not None and keys > self.window - 1:  # the first query's window
            keys = self.window - 1
            slots = slice(slots.stop - keys, slots.stop) if isinstance(slots, slice) else slots[:, -keys:]
        past_k, past_v = self._context(slots, 1, q.dtype)
        o_past, lse_past = attention_with_lse(rows, past_k, past_v, causal=False, mask=self._band(n, keys, group, q))
        o_past = o_past.reshape(heads, n, self.head_dim)
        lse_past = lse_past.reshape(heads, n, 1)
        o_new, lse_new = o_new[0], lse_new.reshape(heads, n, 1)
        lse = torch.logaddexp(lse_past, lse_new)
        merged = o_past * (lse_past - lse).exp() + o_new * (lse_new - lse).exp()
        return merged.to(q.dtype).transpose(0, 1)

    def _decode_mask(self, group: DecodeGroup, longest: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The group's padding mask, plus, under a sliding window, each row's keys before its window."""
        if self.window is None:
            return group.mask
        first = (group.lengths - self.window).clamp(min=0).unsqueeze(1)  # each row's first visible key
        hidden = torch.arange(longest, device=first.device) < first
        base = (
            group.mask
            if group.mask is not None
            else torch.zeros(group.count, 1, 1, longest, dtype=dtype, device=first.device)
        )
        return base.masked_fill(hidden.view(group.count, 1, 1, longest), float("-inf"))

    def _band(self, n: int, keys: int, group: int, q: torch.Tensor) -> torch.Tensor | None:
        """Sliding window over a chunk's last `keys` cached keys: query i sees key k iff
        k >= keys + i - window + 1; None where every query sees them all. Rows ordered as the
        past call's (query head within the group, then query)."""
        if self.window is None or keys + n <= self.window:
            return None
        i = torch.arange(n, device=q.device).unsqueeze(1)
        hidden = torch.arange(keys, device=q.device) < keys + i - self.window + 1
        band = torch.zeros(n, keys, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
        return band.repeat(group, 1).view(1, 1, group * n, keys)

    def _context(
        self, slots: torch.Tensor | slice, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` ((batch, length) or a slice), each (batch, kv_heads, length,
        head_dim) in `dtype` (int8 rows scaled back): one gather for both planes. index_select, not
        advanced indexing: ~10x faster for this gather on CPU."""

        def gather(cache: torch.Tensor) -> torch.Tensor:
            return cache[:, :, slots] if isinstance(slots, slice) else cache.index_select(2, slots.flatten())

        ctx = gather(self.kv_cache)
        ctx = (
            (ctx.float() * gather(self.kv_scale).unsqueeze(-1)).to(dtype)
            if self.kv_scale is not None
            else ctx.to(dtype)
        )
        ctx = ctx.view(2, self.num_kv_heads, batch, -1, self.head_dim).transpose(1, 2)
        return ctx[0], ctx[1]
