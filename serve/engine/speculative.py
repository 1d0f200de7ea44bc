"""n-gram (prompt-lookup) speculative decoding: drafts from the sequence's own tokens, no draft model.

Text that copies from its context (an answer quoting a long document, code edited in place,
a list continued) repeats n-grams that are already in the prompt. Before a step, for each
decoding sequence the proposer looks up its last n tokens (n from `lookup_max` down to
`lookup_min`) earlier in its own tokens and, at the most recent match, proposes the k tokens
that followed (Saxena's prompt lookup decoding; vLLM's `ngram` method). The drafts are appended
to the sequence, so the scheduler runs them as a chunk of 1 + k tokens with logits at every
position (one forward pass instead of k + 1); `accept` then keeps the drafts the model itself
would have produced, up to the first it would not, plus the model's own token after them.

Greedy sequences only: the target's choice at each position is its argmax, so the output is
the same tokens as without drafts (up to floating-point near-ties between the chunk and decode
kernels, as for batch invariance). Sequences that sample, apply penalties, biases, token
restrictions, `min_tokens`, logprobs or a grammar decode one token a step, as without drafts
(what vLLM's rejection sampler does for sampled requests is not implemented here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from serve.engine.sampler import greedy_tokens
from serve.engine.sequence import Sequence


@dataclass
class NgramProposer:
    num_speculative_tokens: int  # k: drafts per step and sequence
    lookup_max: int = 4  # longest n-gram matched
    lookup_min: int = 2  # shortest

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.lookup_min <= self.lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.lookup_min} and {self.lookup_max}"
            )

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) tokens that followed the most recent earlier occurrence of the
        sequence's last n tokens, for the longest n that occurs; [] if none does."""
        k = min(self.num_speculative_tokens, limit)
        if k < 1:
            return []
        ids = np.asarray(tokens, dtype=np.int64)
        for n in range(self.lookup_max, self.lookup_min - 1, -1):
            if len(ids) <= n:
                continue
            earlier = sliding_window_view(ids[:-1], n)  # every n-gram with a token after it
            hits = np.flatnonzero((earlier == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ids[start : start + k].tolist()
        return []


def eligible(seq: Sequence) -> bool:
    """Whether seq may decode with drafts: a greedy decode with nothing that reads the output
    token by token (penalties, biases, restrictions, min_tokens, logprobs, a grammar)."""
    p = seq.params
    return (
        seq.num_tokens - seq.num_computed_tokens == 1
        and p.temperature == 0
        and p.logprobs is None
        and seq.matcher is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and not p.logit_bias
        and p.allowed_token_ids is None
        and not p.bad_words
        and not p.min_tokens
        and not seq.computes_prompt_logprobs
    )


def accept(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens a verified chunk yields: the drafts up to the first the model's own choice
    (`targets[i]`, its argmax after draft i - 1) differs from, then the model's choice there.
    len(targets) == len(drafts) + 1 (the chunk's last row predicts past every draft)."""
    kept = 0
    while kept < len(drafts) and drafts[kept] == targets[kept]:
        kept += 1
    return drafts[:kept] + [targets[kept]]


class NgramSpeculator:
    """The engine's side of it: drafts appended before scheduling, taken back from sequences
    the step did not run, verified after it; counts what was proposed and accepted."""

    def __init__(self, proposer: NgramProposer) -> None:
        self.proposer = proposer
        self.num_drafts = 0  # verified proposals (vLLM's spec_decode_num_drafts)
        self.num_draft_tokens = 0  # draft tokens verified
        self.num_accepted_tokens = 0  # of which the model agreed with
        self._drafted: list[Sequence] = []  # this step's drafted sequences

    def draft(self, running: list[Sequence]) -> None:
        """Append drafts to every eligible running sequence (never past its max_tokens)."""
        self._drafted = []
        for seq in running:
            if eligible(seq) and (
                drafts := self.proposer.propose(seq.token_ids, seq.params.max_tokens - len(seq.output_token_ids) - 1)
            ):
                seq.token_ids += drafts
                seq.num_drafts = len(drafts)
                self._drafted.append(seq)

    def undraft_unscheduled(self, batch: list[tuple[Sequence, int]]) -> None:
        """Take the drafts back from the drafted sequences the step will not run (left out by the
        budget, or preempted)."""
        ran = {seq.seq_id for seq, _ in batch}
        for seq in self._drafted:
            if seq.seq_id not in ran:
                self.undraft(seq)

    @staticmethod
    def undraft(seq: Sequence) -> None:
        """Take a sequence's drafts back (it was not scheduled, or was preempted)."""
        if seq.num_drafts:
            del seq.token_ids[-seq.num_drafts :]
            seq.num_drafts = 0

    def verify(self, seq: Sequence, n: int, logits: torch.Tensor) -> list[int]:
        """After a step ran `n` of seq's positions from its last real token on (logits: their n
        rows): the tokens it yields (serve.engine.speculative.accept). The drafts are taken back
        out of token_ids; num_computed_tokens covers the real last token, whose K/V the step
        computed (the kept drafts' K/V too: the caller advances over them as it appends them)."""
        start = seq.num_computed_tokens
        drafts = seq.token_ids[start + 1 : start + n]
        tokens = accept(drafts, greedy_tokens(logits))
        self.undraft(seq)
        seq.num_computed_tokens = start + 1
        self.num_drafts += bool(drafts)
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += len(tokens) - 1
        return tokens
