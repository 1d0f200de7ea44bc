"""Engine outputs in the OpenAI protocol's shapes: a batch's usage (tokens, cached tokens,
measured FLOPs beside 2NT) and logprobs in the legacy completions and the chat formats, whole
or a stream chunk's share (serve.api.server sends them)."""

from __future__ import annotations

from serve.api.protocol import ChatLogprobs, CompletionLogprobs, Flops, TokenLogprob, TopLogprob, Usage
from serve.engine.llm_engine import CompletionOutput, RequestOutput


def batch_usage(finals: list[RequestOutput]) -> Usage:
    """Token counts and FLOPs, summed over the requests of a batch."""
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
    by_part: dict[str, int] = {}
    for f in finals:
        for part, flops in f.metrics.flops_by_part.items():
            by_part[part] = by_part.get(part, 0) + flops
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": sum(f.metrics.cached_prompt_tokens for f in finals)},
                 flops=Flops(measured=sum(f.metrics.measured_flops for f in finals), law_2NT=sum(f.metrics.law_flops for f in finals),
                             by_part=by_part))


def prompt_logprob_entries(out: RequestOutput, tokenizer) -> list[dict]:
    """The prompt's per-token entries, its first token (no logprob: nothing predicts it) included."""
    first = {"token_id": out.prompt_token_ids[0], "token": tokenizer.decode([out.prompt_token_ids[0]]), "logprob": None, "top": None}
    return [first] + out.prompt_logprobs[1:]


def completion_logprobs(c: CompletionOutput, streamed: bool, prompt: list[dict] | None = None, echo_len: int = 0) -> CompletionLogprobs:
    """The legacy completions format, for this step's tokens (`streamed`) or all of them,
    after the echoed prompt's tokens when given; text offsets count the echoed text (`echo_len`)."""
    entries = (prompt or []) + logprob_entries(c, streamed)
    offset = echo_len + len(c.text) - len(c.new_text) if streamed and not prompt else 0
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return CompletionLogprobs(
        tokens=[e["token"] for e in entries],
        token_logprobs=[e["logprob"] for e in entries],
        top_logprobs=[None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]} for e in entries],
        text_offset=offsets,
    )


def chat_logprobs(c: CompletionOutput, streamed: bool) -> ChatLogprobs:
    """The chat format, for this step's tokens (`streamed`) or all of them."""
    entries = logprob_entries(c, streamed)
    return ChatLogprobs(content=[
        TokenLogprob(token=e["token"], logprob=e["logprob"], bytes=list(e["token"].encode()),
                     top_logprobs=[TopLogprob(token=t["token"], logprob=t["logprob"], bytes=list(t["token"].encode())) for t in e["top"]])
        for e in entries
    ])


def logprob_entries(c: CompletionOutput, streamed: bool) -> list[dict]:
    """c.logprobs holds one entry per generated token so far; a stream chunk carries this step's."""
    entries = c.logprobs or []
    return entries[len(entries) - len(c.new_token_ids):] if streamed else entries
