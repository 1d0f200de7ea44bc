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

from profiling.formulas.llama import DecoderShape, decoder_flops
from profiling.measure import attention_flops
from profiling.parts import ATTENTION, DENSE, LM_HEAD


class FlopAttribution:
    def __init__(self, shape: DecoderShape) -> None:
        self.shape = shape
        per_token = decoder_flops(shape, q_len=1, past_len=0, logits=1)
        self.dense_per_token = per_token[DENSE]
        self.lm_head_per_row = per_token[LM_HEAD]

    def _attention(self, q_len: int, k_len: int, causal: bool) -> int:
        """All layers' QK^T + AV FLOPs of one attention call with this shape."""
        s = self.shape
        return s.layers * attention_flops(1, s.heads, q_len, k_len, s.head_dim, s.head_dim, causal)

    def decode(self, context: int) -> dict[str, int]:
        """A decode: one token, one query over `context` keys (its own context in the paged
        kernel; its group's longest, padding included, in a gathered batch), one logits row."""
        return {DENSE: self.dense_per_token, ATTENTION: self._attention(1, context, False), LM_HEAD: self.lm_head_per_row}

    def chunk(self, q_len: int, past: int, logits: int) -> dict[str, int]:
        """A prefill chunk: q_len tokens, their queries causal over themselves and over all
        `past` cached keys (causal_pairs(q_len, past) exactly), `logits` rows (0 or 1)."""
        attention = self._attention(q_len, q_len, True) + (self._attention(q_len, past, False) if past else 0)
        return {DENSE: q_len * self.dense_per_token, ATTENTION: attention, LM_HEAD: logits * self.lm_head_per_row}
