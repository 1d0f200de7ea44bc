"""Each sequence's share of the bytes a step moves to and from memory, beside its FLOPs.

A decode step on a CPU or GPU is usually bound by bytes, not arithmetic: every weight is read
once per step whatever the batch, and every sequence's K/V once per layer. So the ledger keeps,
next to each request's FLOPs (serve.engine.flops), the bytes its steps moved, modelled from what
the step ran (not read from hardware counters):

- weights: the linears' weights as stored (serve.layers.linear: a float16 copy counts 2 bytes a
  weight), read once per step and shared by its rows: a sequence with n of the step's R rows is
  charged n/R of the dense weights, and its logits rows' share of the lm-head's;
- kv_read: the cached K/V its attention read: a decode its own context (its group's longest,
  padding included, in a gathered batch), a prefill chunk its cached past; clipped to each
  layer's sliding window as the kernels clip it;
- kv_write: the K/V of its new tokens.

FLOPs over these bytes is the request's arithmetic intensity; against a machine's balance
(peak FLOP/s over memory bandwidth) it says whether its steps were compute- or
bandwidth-bound (`ministack flops report --bandwidth`).
"""

from __future__ import annotations

from torch import nn

from serve.engine.flops import layer_keys

WEIGHTS, KV_READ, KV_WRITE = "weights", "kv_read", "kv_write"


class ByteAttribution:
    def __init__(
        self, model: nn.Module, lm_head: nn.Module, kv_bytes_per_token: int, layers: int, windows: list[int | None]
    ) -> None:
        """`kv_bytes_per_token`: one token's K and V over every layer (int8 scales included)."""
        from serve.layers.linear import Linear

        stored = {id(m): m.stored_weight() for m in model.modules() if isinstance(m, Linear)}
        head = stored.pop(id(lm_head), None)
        self.lm_head_bytes = head.numel() * head.element_size() if head is not None else 0
        self.dense_bytes = sum(w.numel() * w.element_size() for w in stored.values())
        self.kv_per_layer_token = kv_bytes_per_token // layers
        self.windows = windows

    def share(
        self,
        rows: int,
        step_rows: int,
        logits: int,
        step_logits: int,
        kv_read_tokens: int,
        windowed: bool,
        reach: int = 0,
    ) -> dict[str, int]:
        """A sequence's bytes of one step: `rows` of the step's `step_rows`, `logits` of its
        `step_logits` lm-head rows, `kv_read_tokens` cached tokens read (clipped to each layer's
        window if `windowed`, a chunk's past reaching `reach` = 1 token less), `rows` written."""
        weights = self.dense_bytes * rows / step_rows + (
            self.lm_head_bytes * logits / step_logits if step_logits else 0
        )
        keys = layer_keys(kv_read_tokens, reach, self.windows) if windowed else [kv_read_tokens] * len(self.windows)
        read = self.kv_per_layer_token * sum(keys)
        return {WEIGHTS: round(weights), KV_READ: read, KV_WRITE: self.kv_per_layer_token * len(self.windows) * rows}
