"""The logits a sequence samples from: the model's raw logits changed by what its request asked
for, for the whole batch at once (one tensor op per kind over the rows that want it, not a
Python loop over the vocabulary per request).

In vLLM's order: allowed_token_ids (all others to -inf), logit_bias (added), min_tokens (EOS and
stop_token_ids to -inf until that many tokens are out), bad_words (the last token of a banned
sequence whose prefix ends the output, or a one-token word, to -inf), repetition_penalty
(CTRL, Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor: every token of the
prompt and the output, logit / p where positive, x p where not), then OpenAI's presence and
frequency penalties on the output's token counts c: logit - c x frequency - (c > 0) x presence.
Temperature, top-k, top-p and min-p come after, in the sampler. Logprobs stay those of the raw
logits (OpenAI's and vLLM's default).
"""

from __future__ import annotations

import torch

from serve.engine.sequence import Sequence


def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[len(lists), longest] int64, short rows filled with `pad`."""
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), pad, dtype=torch.int64)
    for i, x in enumerate(lists):
        if x:
            out[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
    return out.to(device)


def banned_tokens(seq: Sequence, eos_token_ids: set[int]) -> set[int]:
    """Token ids this sequence may not take next: EOS and stop tokens before min_tokens, and the
    completing token of every bad word whose prefix ends its output."""
    p, out = seq.params, seq.output_token_ids
    banned: set[int] = set()
    if len(out) < p.min_tokens:
        banned |= set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
    for word in seq.request.bad_words_ids:
        prefix = word[:-1]
        if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix) :] == prefix):
            banned.add(word[-1])
    return banned


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> torch.Tensor:
    """Row i of `logits` ([len(seqs), vocab] float32) processed for seqs[i]'s request; the input
    itself when no sequence asks for anything, else a new tensor (the raw logits stay for logprobs)."""
    rows = [i for i, s in enumerate(seqs) if s.params.processes_logits]
    if not rows:
        return logits
    out = logits.clone()
    vocab, device = out.shape[1], out.device
    neg_inf = float("-inf")

    allowed = [i for i in rows if seqs[i].params.allowed_token_ids is not None]
    if allowed:
        ids = _padded([seqs[i].params.allowed_token_ids for i in allowed], vocab, device)
        keep = torch.zeros((len(allowed), vocab + 1), dtype=torch.bool, device=device)  # + the pad column
        keep.scatter_(1, ids, True)
        index = torch.tensor(allowed, device=device)
        out[index] = out[index].masked_fill(~keep[:, :vocab], neg_inf)

    pairs = [(i, t, v) for i in rows for t, v in seqs[i].params.logit_bias.items()]
    if pairs:
        r, t, v = zip(*pairs)
        out.index_put_(
            (torch.tensor(r, device=device), torch.tensor(t, device=device)),
            torch.tensor(v, dtype=out.dtype, device=device),
            accumulate=True,
        )

    banned = [(i, t) for i in rows for t in banned_tokens(seqs[i], eos_token_ids)]
    if banned:
        r, t = zip(*banned)
        out[torch.tensor(r, device=device), torch.tensor(t, device=device)] = neg_inf

    repeat = [i for i in rows if seqs[i].params.repetition_penalty != 1]
    if repeat:
        index = torch.tensor(repeat, device=device)
        ids = _padded([seqs[i].token_ids for i in repeat], vocab, device)  # pad: an extra column, dropped
        p = torch.tensor([seqs[i].params.repetition_penalty for i in repeat], dtype=out.dtype, device=device)[:, None]
        block = torch.cat([out[index], torch.zeros((len(repeat), 1), dtype=out.dtype, device=device)], 1)
        seen = block.gather(1, ids)
        block.scatter_(1, ids, torch.where(seen > 0, seen / p, seen * p))
        out[index] = block[:, :vocab]

    counted = [i for i in rows if seqs[i].params.presence_penalty or seqs[i].params.frequency_penalty]
    if counted:
        index = torch.tensor(counted, device=device)
        ids = _padded([seqs[i].output_token_ids for i in counted], vocab, device)
        counts = torch.zeros((len(counted), vocab + 1), dtype=out.dtype, device=device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=out.dtype))
        counts = counts[:, :vocab]
        freq = torch.tensor([seqs[i].params.frequency_penalty for i in counted], dtype=out.dtype, device=device)[
            :, None
        ]
        pres = torch.tensor([seqs[i].params.presence_penalty for i in counted], dtype=out.dtype, device=device)[:, None]
        out[index] -= counts * freq + (counts > 0).to(out.dtype) * pres
    return out
