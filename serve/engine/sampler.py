"""Choosing each sequence's next token from its logits, and the logprobs a request asked for.

The logits are first processed as each request asks (serve.engine.logits_processors: allowed
tokens, bias, min_tokens, bad words, penalties). Greedy rows then take the argmax. Sampled rows
divide by the temperature, keep the top-k, keep the smallest set of tokens whose probability
reaches top-p, drop those below min-p x the top probability, and draw with the sequence's own
torch.Generator: a seeded request gets the same tokens whatever else shares its batch.
Logprobs are those of the raw logits (log-softmax before any processing, temperature and
truncation), as OpenAI and vLLM report them.

Every value the API accepts must give a valid distribution, so the arithmetic is guarded where
float32 runs out: temperatures below SAMPLING_EPS sample greedily (vLLM's rule: dividing by
1e-300 is inf), truncation always keeps the most likely token (a top_p of 1e-300 is 0 in
float32), a NaN logit counts as banned, and a row holding +inf logits (a vanishing
repetition penalty divides by zero) keeps only those tokens, the limit of what it asked. A row
left with no token at all (everything banned) fails its own request, never the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.engine.logits_processors import process_logits
from serve.engine.outputs import RequestError
from serve.engine.sequence import Sequence
from serve.kernels import op


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax of (rows, vocab) logits, as torch.argmax picks it (the first maximum):
    serve.kernels' argmax_rows for float32 on the CPU (~10x torch's there), else torch's."""
    fast = (
        op("argmax_rows")
        if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]
        else None
    )
    return (fast(logits) if fast is not None else torch.argmax(logits, -1)).tolist()


def truncated_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after temperature, top-k, top-p and min-p (Nguyen et al. 2024: keep the
    tokens at least min_p x the most likely one's probability), for one row. When truncating,
    they are over the kept tokens sorted by descending logit and the second result maps them
    back to token ids; otherwise over the whole vocabulary (second result None)."""
    logits = logits / temperature
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return torch.softmax(logits, -1), None
    k = top_k if 0 < top_k < logits.numel() else logits.numel()
    values, ids = torch.topk(logits, k)  # sorted, descending
    probs = torch.softmax(values, -1)
    if top_p < 1.0:
        before = torch.cumsum(probs, -1) - probs  # mass of the tokens ranked above each one
        keep = max(1, int((before < top_p).sum()))  # the first token always stays (a tiny top_p is 0 in float32)
        probs, ids = probs[:keep] / probs[:keep].sum(), ids[:keep]
    if min_p > 0.0:
        keep = max(1, int((probs >= min_p * probs[0]).sum()))  # sorted: the first is the largest
        probs, ids = probs[:keep] / probs[:keep].sum(), ids[:keep]
    return probs, ids


@dataclass
class Draw:
    """One sequence's sampled token and its logprob entry, or why none could be drawn."""

    token: int = -1
    entry: dict | None = None
    error: RequestError | None = None


def drawable(logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, RequestError]]:
    """The logits with every row made safe to sample (see the module docstring), and the rows
    that have no token left, with the reason. One reduction finds the rows to look at (a NaN or
    +inf makes the row's max non-finite, and so does a row of -inf only); the rest pass untouched."""
    top = logits.max(-1).values
    suspect = (~torch.isfinite(top)).nonzero().flatten().tolist()
    if not suspect:
        return logits, {}
    logits, failed = logits.clone(), {}
    neg_inf = float("-inf")
    for i in suspect:
        row = torch.where(torch.isnan(logits[i]), neg_inf, logits[i])
        infinite = row == float("inf")
        if infinite.any():
            row = torch.where(infinite, 0.0, neg_inf)
        logits[i] = row
        if not torch.isfinite(row.max()):
            nan = "NaN or " if torch.isnan(top[i]) else ""
            failed[i] = RequestError(
                f"no token can be sampled: every token's logit is {nan}-inf after the request's "
                "logit processing (allowed_token_ids, logit_bias, bad_words, min_tokens or a "
                "structured output banned them all)",
                invalid=True,
            )
    return logits, failed


class Sampler:
    def __init__(self, token_text) -> None:
        self.token_text = token_text  # token id -> its text (for logprob entries)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int] = frozenset(), grammars=None
    ) -> list[Draw]:
        """The next token of each sequence (row i of logits is seqs[i]) and its logprob entry,
        or the reason it has none (that sequence's request fails; the others go on);
        `eos_token_ids`: what min_tokens holds back; `grammars` (serve.engine.structured.Grammars)
        masks the rows of sequences with a structured output."""
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs = torch.log_softmax(logits, -1) if wants_logprobs else None
        processed = process_logits(logits, seqs, eos_token_ids)
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            processed = processed.clone() if processed is logits else processed  # masked in place: never the caller's
            json_rows = [i for i in constrained if seqs[i].params.structured.kind == "json"]
            grammars.mask(processed, constrained, [seqs[i].matcher for i in constrained], json_rows)
        logits, failed = drawable(processed)
        greedy = greedy_tokens(logits)
        out: list[Draw] = []
        for i, seq in enumerate(seqs):
            if i in failed:
                out.append(Draw(error=failed[i]))
                continue
            p = seq.params
            token = greedy[i]
            if not p.greedy:
                probs, ids = truncated_probs(logits[i], p.temperature, p.top_k, p.top_p, p.min_p)
                pick = int(torch.multinomial(probs, 1, generator=seq.generator))
                token = int(ids[pick]) if ids is not None else pick
            entry = None
            if p.logprobs is not None:
                entry = self.logprob_entry(logprobs[i], token, p.logprobs)
            out.append(Draw(token, entry))
        return out

    def logprob_entry(self, row: torch.Tensor, token: int, k: int) -> dict:
        """`token`'s log-probability in the log-softmax `row`, with the top-`k` alternatives."""
        entry = {"token_id": token, "token": self.token_text(token), "logprob": float(row[token]), "top": []}
        if k:
            values, ids = torch.topk(row, min(k, row.numel()))
            entry["top"] = [
                {"token_id": t, "token": self.token_text(t), "logprob": v}
                for t, v in zip(ids.tolist(), values.tolist())
            ]
        return entry
