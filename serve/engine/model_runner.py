"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and returns
the logits to sample from plus each sequence's FLOPs.

The cache is one tensor (2, layers, kv_heads, num_blocks * block_size, head_dim): slot
`block * block_size + offset` of a layer and head holds one token's K (or V). Each attention
layer gets a view of its K and V planes. The step's tokens are laid out decodes first, then
prefill chunks. Decodes go to the paged decode kernel with their block tables where it is
built (the CPU: serve.kernels); otherwise they are sorted by context length and cut into groups
that each make one batched attention call over gathered contexts (serve.layers.attention).
"""

from __future__ import annotations

import torch

from profiling.formulas.llama import DecoderShape
from serve.engine.flops import FlopAttribution
from serve.engine.traffic import ByteAttribution
from serve.engine.sequence import Sequence
from serve.kernels import op
from serve.layers.attention import AttentionMetadata, DecodeGroup, PagedDecodes, PrefillChunk
from serve.models.llama import LlamaForCausalLM


# What one more decode attention call per layer costs, in padded context tokens (each copied
# out of the cache and attended to by a batched call). On a CPU a padded token costs ~8 us per
# step (SmolLM2, 2 cores) and a call ~2 ms, so a group pays for itself once it saves ~256
# padded tokens; on a GPU the copy is nearly free and a call is kernel launches.
GROUP_COST_TOKENS = {"cpu": 256, "cuda": 8192}


def kv_bytes_per_block(shape: DecoderShape, block_size: int, kv_dtype: torch.dtype) -> int:
    """Bytes of one block's K and V over every layer; int8 adds a float32 scale per token and head."""
    per_row = shape.head_dim * kv_dtype.itemsize + (4 if kv_dtype == torch.int8 else 0)
    return 2 * shape.layers * block_size * shape.kv_heads * per_row


def length_groups(lengths: list[int], group_cost: int) -> list[int]:
    """Sizes of consecutive groups cutting ascending `lengths` so that padding every member to
    its group's longest, plus `group_cost` per group, is least (exact, O(n^2) dynamic program)."""
    n = len(lengths)
    best, cut = [0] + [0] * n, [0] * (n + 1)  # best[j]: cost of the first j; cut[j]: its last group's size
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + (j - i) * lengths[j - 1] + group_cost, j - i) for i in range(j))
    sizes = []
    while n:
        sizes.append(cut[n])
        n -= cut[n]
    return sizes[::-1]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        shape: DecoderShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: the model's; `kv_dtype`: the cache's storage (default the model's)."""
        self.model, self.block_size, self.device, self.dtype = model, block_size, device, dtype
        kv_dtype = kv_dtype or dtype
        self.group_cost = GROUP_COST_TOKENS.get(device.type, GROUP_COST_TOKENS["cuda"])
        self.decode_kernel = device.type == "cpu" and op("paged_decode_attention") is not None  # else: gathered groups
        windows = [attn.window for attn in model.attention_layers()]
        self.flops = FlopAttribution(shape, windows)
        self.traffic = ByteAttribution(
            model, model.lm_head, kv_bytes_per_block(shape, block_size, kv_dtype) // block_size, shape.layers, windows
        )
        self._step_rows = self._step_logits = 0  # the step being planned: its rows and lm-head rows (byte shares)
        # where --rope-scaling added a scaled RoPE, requests within the native context index the
        # model's own rotations at position + this offset (serve.layers.rope)
        self.native_rope_offset = model.model.rotary_emb.native_offset
        # zeros, not empty: padded decode rows read slot 0.., and masked garbage could be NaN
        self.kv = torch.zeros(
            2, shape.layers, shape.kv_heads, num_blocks * block_size, shape.head_dim, dtype=kv_dtype, device=device
        )
        # an int8 cache's scales, one per token, head and plane (ones: a padded row reads slot 0..)
        self.kv_scale = (
            torch.ones(2, shape.layers, shape.kv_heads, num_blocks * block_size, device=device)
            if kv_dtype == torch.int8
            else None
        )
        for i, attn in enumerate(model.attention_layers()):
            attn.kv_cache = self.kv[:, i]
            attn.kv_scale = self.kv_scale[:, i] if self.kv_scale is not None else None

    def read_block(self, block_id: int) -> dict[str, torch.Tensor]:
        """A copy of one block's K and V over every layer, (layers, kv_heads, block_size, head_dim)
        each, on the CPU (and an int8 cache's scales): what the disk tier stores."""
        slots = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        out = {"k": self.kv[0, :, :, slots].cpu().clone(), "v": self.kv[1, :, :, slots].cpu().clone()}
        if self.kv_scale is not None:
            out |= {
                "k_scale": self.kv_scale[0, :, :, slots].cpu().clone(),
                "v_scale": self.kv_scale[1, :, :, slots].cpu().clone(),
            }
        return out

    def write_block(self, block_id: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `read_block`'s tensors into block `block_id` (shapes and dtypes checked)."""
        slots = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        planes = [("k", self.kv[0]), ("v", self.kv[1])]
        if self.kv_scale is not None:
            planes += [("k_scale", self.kv_scale[0]), ("v_scale", self.kv_scale[1])]
        for name, plane in planes:
            source, target = tensors[name], plane[:, :, slots]
            if source.shape != target.shape or source.dtype != target.dtype:
                raise ValueError(
                    f"block tensor {name}: {tuple(source.shape)} {source.dtype}, the cache holds {tuple(target.shape)} {target.dtype}"
                )
            target.copy_(source)

    def _context_slots(self, tables: list[list[int]], length: int) -> torch.Tensor | slice:
        """(len(tables), length) cache slots of the first `length` tokens of each block table
        (shorter tables padded with block 0: those positions are masked). A single table of
        consecutive blocks (usual for a long sequence: the free list hands out runs) is a
        slice, which reads the cache in place instead of gathering a copy of it."""
        width = -(-length // self.block_size)
        if (
            len(tables) == 1
            and tables[0][0] >= 0
            and tables[0][:width] == list(range(tables[0][0], tables[0][0] + width))
        ):
            start = tables[0][0] * self.block_size
            return slice(start, start + length)
        # FREED entries (out of the window: masked or sliced away by the attention layer) read block 0
        padded = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], dtype=torch.long).clamp_(
            min=0
        )
        slots = padded.unsqueeze(-1) * self.block_size + torch.arange(self.block_size)
        return slots.flatten(1)[:, :length].to(self.device)

    @torch.no_grad()  # not inference_mode: profiling.measure needs autograd sequence numbers
    def execute(
        self, batch: list[tuple[Sequence, int]]
    ) -> tuple[torch.Tensor, list[Sequence], list[tuple[Sequence, int]], list[tuple[Sequence, range]]]:
        """Run one step of (sequence, new tokens) pairs. Returns float32 logits: first one row per
        sequence whose computed tokens reach its end (it samples next), then one row per position
        of each sequence verifying speculative drafts (serve.engine.speculative: its n rows), then,
        for sequences computing prompt logprobs, one row per prompt position of their chunk that
        predicts a prompt token; the sampling sequences; the verifying (sequence, n) pairs; and
        the prompt-logprob (sequence, positions) spans, each in row order. Adds each sequence's
        FLOPs and bytes of the step to seq.flops / seq.bytes; does not advance num_computed_tokens.

        A drafted sequence's positions run as decode queries (one per position, each over the
        context up to itself), not as a prefill chunk: the same kernels as plain decoding, so the
        logits it verifies against are the ones plain decoding would have produced."""
        bs = self.block_size
        decoding, prefills = [], []  # decode queries: one new token after a computed context, or drafts to verify
        for s, n in batch:
            (decoding if s.num_drafts or (n == 1 and s.num_computed_tokens > 0) else prefills).append((s, n))
        decodes = sorted(
            ((s, s.num_computed_tokens + i) for s, n in decoding for i in range(n)), key=lambda e: e[1]
        )  # (seq, position)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Sequence] = []
        drafted_rows: dict[int, list[int]] = {}
        prompt_rows: list[int] = []
        prompt_spans: list[tuple[Sequence, range]] = []
        for seq, pos in decodes:
            if seq.num_drafts:  # row i checks draft i (its position's logits)
                drafted_rows.setdefault(seq.seq_id, []).append(len(ids))
            else:
                logits_rows.append(len(ids))
                sampling.append(seq)
            ids.append(seq.token_ids[pos])
            positions.append(pos + self._rope_offset(seq))
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
        verifying = [(s, n) for s, n in decoding if s.num_drafts]
        verify_rows = [row for s, _ in verifying for row in drafted_rows[s.seq_id]]
        for seq, n in prefills:
            start, table = seq.num_computed_tokens, seq.block_table
            first_row = len(ids)
            ids += seq.token_ids[start : start + n]
            positions += range(start + self._rope_offset(seq), start + n + self._rope_offset(seq))
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if start + n == seq.num_tokens:
                logits_rows.append(len(ids) - 1)
                sampling.append(seq)
            if seq.computes_prompt_logprobs:  # every position but the prompt's last predicts a prompt token
                span = range(start, min(start + n, seq.num_prompt_tokens - 1))
                prompt_rows += [first_row + p - start for p in span]
                prompt_spans.append((seq, span))
        logits_per_seq = {s.seq_id: 1 for s in sampling} | {
            s.seq_id: len(span) + (s in sampling) for s, span in prompt_spans
        }
        meta = AttentionMetadata(slot_mapping=self._tensor(slots))
        self._step_rows, self._step_logits = len(ids), len(logits_rows) + len(verify_rows) + len(prompt_rows)
        start = 0
        if decodes and self.decode_kernel:
            meta.paged = self._plan_paged(decodes)
            start = len(decodes)
        for size in length_groups([pos + 1 for _, pos in decodes], self.group_cost) if not meta.paged else ():
            meta.decodes.append(self._plan_decodes(decodes[start : start + size], start))
            start += size
        for seq, n in prefills:
            meta.prefills.append(self._plan_chunk(seq, start, n, logits_per_seq.get(seq.seq_id, 0)))
            start += n
        logits = self.model(
            self._tensor(ids), self._tensor(positions), meta, self._tensor(logits_rows + verify_rows + prompt_rows)
        )
        return logits.float(), sampling, verifying, prompt_spans

    def _rope_offset(self, seq: Sequence) -> int:
        """Where seq's rows look their RoPE rotations up: the native table unless it needs scaling."""
        return self.native_rope_offset if self.native_rope_offset is not None and not seq.request.rope_scaled else 0

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _plan_paged(self, decodes: list[tuple[Sequence, int]]) -> PagedDecodes:
        """All decode queries (sequence, position) in one kernel call: block tables and context
        lengths, nothing gathered."""
        lengths = [pos + 1 for _, pos in decodes]
        width = -(-max(lengths) // self.block_size)
        tables = [
            s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s, _ in decodes
        ]  # FREED: never read
        for (seq, _), n in zip(decodes, lengths):
            self._charge(seq, self.flops.decode(n, windowed=True))  # exactly its own context (window)
            self._charge_bytes(seq, 1, 1, n, windowed=True)
        return PagedDecodes(
            len(decodes),
            torch.tensor(tables, dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int32),
            self.block_size,
        )

    def _plan_decodes(self, decodes: list[tuple[Sequence, int]], start: int) -> DecodeGroup:
        """One batched call for a group of decode queries (sequence, position): every context
        padded to the longest, the padding masked."""
        lengths = [pos + 1 for _, pos in decodes]
        longest = max(lengths)
        slots = self._context_slots([s.block_table for s, _ in decodes], longest)
        group = DecodeGroup(start, len(decodes), slots, torch.tensor(lengths, device=self.device))
        if min(lengths) < longest:
            allowed = torch.arange(longest) < torch.tensor(lengths).unsqueeze(1)
            mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
            group.mask = mask.view(len(decodes), 1, 1, longest).to(self.device, self.dtype)
        for seq, _ in decodes:
            self._charge(seq, self.flops.decode(longest))  # its row of the call spans the group's longest context
            self._charge_bytes(seq, 1, 1, longest, windowed=False)
        return group

    def _plan_chunk(self, seq: Sequence, start: int, n: int, logits: int) -> PrefillChunk:
        """A chunk's own attention: causal over its fresh K/V, plus its cached past if any."""
        past = seq.num_computed_tokens
        chunk = PrefillChunk(start, n, past, self._context_slots([seq.block_table], past) if past else None)
        self._charge(seq, self.flops.chunk(n, past, logits=logits))
        self._charge_bytes(seq, n, logits, past, windowed=True, reach=1)
        return chunk

    @staticmethod
    def _charge(seq: Sequence, flops: dict[str, int]) -> None:
        for part, n in flops.items():
            seq.flops[part] += n

    def _charge_bytes(
        self, seq: Sequence, rows: int, logits: int, kv_read_tokens: int, windowed: bool, reach: int = 0
    ) -> None:
        """Add the sequence's share of the step's bytes (serve.engine.traffic) to seq.bytes."""
        shares = self.traffic.share(rows, self._step_rows, logits, self._step_logits, kv_read_tokens, windowed, reach)
        for part, n in shares.items():
            seq.bytes[part] += n
