"""Each sequence's share of a step's FLOPs, known from what the step ran, at no run-time cost.

The model runner knows every op it launched: the linears saw `tokens` rows, each attention
call had a known (queries, keys) shape, the lm-head ran on the rows whose logits were
sampled. So a sequence's FLOPs for a step are its rows of the linears (dense), its own
attention calls or its row of the batched decode call (attention), and its logits row
(lm_head). The attention term is what the kernels computed, the way `profiling.measure`
counts it (tests check the two agree exactly): a prefill chunk computes exactly its
`causal_pairs`; a decode in the paged kernel covers exactly its own context, and a decode row
in a batched call over gathered contexts covers its group's longest context, padding included,
which is the measured cost of batching sequences of unequal length that way.
"""

from __future__ import annotations

from collections import Counter

from profiling.formulas.llama import DecoderShape, decoder_flops
from profiling.measure import attention_flops
from profiling.parts import ATTENTION, DENSE, LM_HEAD


def layer_keys(n: int, reach: int, windows: list[int | None]) -> list[int]:
    """Keys each layer attends to out of `n` cached ones: all, or under a sliding window the last
    `window - reach` (a decode reaches 0, a chunk's past 1: its own first token is in the window)."""
    return [n if w is None else min(n, w - reach) for w in windows]


class FlopAttribution:
    def __init__(self, shape: DecoderShape, windows: list[int | None] | None = None) -> None:
        self.shape = shape
        self.windows = windows or [None] * shape.layers  # each layer's sliding window, None: full
        per_token = decoder_flops(shape, q_len=1, past_len=0, logits=1)
        self.dense_per_token = per_token[DENSE]
        self.lm_head_per_row = per_token[LM_HEAD]

    def _attention(self, q_len: int, k_lens: list[int], causal: bool) -> int:
        """QK^T + AV FLOPs of one attention call per layer, layer l over k_lens[l] keys."""
        s = self.shape
        return sum(
            layers * attention_flops(1, s.heads, q_len, k, s.head_dim, s.head_dim, causal)
            for k, layers in Counter(k_lens).items()
        )

    def _keys(self, n: int, reach: int) -> list[int]:
        return layer_keys(n, reach, self.windows)

    def decode(self, context: int, windowed: bool = False) -> dict[str, int]:
        """A decode: one token, one query over `context` keys (its own context in the paged
        kernel, which `windowed` clips to each layer's window; its group's longest, padding and
        out-of-window keys included, in a gathered batch), one logits row."""
        keys = self._keys(context, 0) if windowed else [context] * self.shape.layers
        return {DENSE: self.dense_per_token, ATTENTION: self._attention(1, keys, False), LM_HEAD: self.lm_head_per_row}

    def chunk(self, q_len: int, past: int, logits: int) -> dict[str, int]:
        """A prefill chunk: q_len tokens, their queries causal over themselves and over the
        `past` cached keys (causal_pairs(q_len, past) exactly; under a sliding window the last
        window - 1 of them, band-masked: every pair computed), `logits` rows (0 or 1, or one
        per position for prompt logprobs)."""
        attention = self._attention(q_len, [q_len] * self.shape.layers, True)
        if past:
            attention += self._attention(q_len, self._keys(past, 1), False)
        return {DENSE: q_len * self.dense_per_token, ATTENTION: attention, LM_HEAD: logits * self.lm_head_per_row}
