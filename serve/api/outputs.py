"""Engine outputs in the OpenAI protocol's shapes: a batch's usage (tokens, cached tokens,
measured FLOPs beside 2NT) and logprobs in the legacy completions and the chat formats, whole
or a stream chunk's share (serve.api.completions and serve.api.chat send them)."""

from __future__ import annotations

from serve.api.responses import ChatLogprobs, CompletionLogprobs, Flops, TokenLogprob, TopLogprob, Usage
from serve.engine.outputs import CompletionOutput, RequestOutput
from serve.engine.token_bytes import TokenBytes


def batch_usage(finals: list[RequestOutput]) -> Usage:
    """Token counts and FLOPs, summed over the requests of a batch."""
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
    by_part: dict[str, int] = {}
    for f in finals:
        for part, flops in f.metrics.flops_by_part.items():
            by_part[part] = by_part.get(part, 0) + flops
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details={
            "cached_tokens": sum(f.metrics.cached_prompt_tokens for f in finals),
            "disk_cached_tokens": sum(f.metrics.disk_cached_prompt_tokens for f in finals),
        },
        flops=Flops(
            measured=sum(f.metrics.measured_flops for f in finals),
            law_2NT=sum(f.metrics.law_flops for f in finals),
            by_part=by_part,
        ),
    )


def prompt_logprob_entries(out: RequestOutput) -> list[dict]:
    """The prompt's per-token entries, its first token (no logprob: nothing predicts it) included."""
    first = {"token_id": out.prompt_token_ids[0], "logprob": None, "top": None}
    return [first] + out.prompt_logprobs[1:]


def _char_offsets(entries: list[dict], tokens: TokenBytes) -> list[int]:
    """Where each token starts in the text, in characters: the whole UTF-8 characters its
    preceding tokens' bytes spell (a token that continues a split character starts where
    that character does)."""
    offsets, chars, pending = [], 0, 0  # pending: bytes still owed by the character being read
    for e in entries:
        offsets.append(chars)
        for b in tokens.bytes(e["token_id"]):
            if pending and b & 0xC0 == 0x80:  # a continuation byte of the character being read
                pending -= 1
                chars += pending == 0
            else:  # a lead byte: 0xF0.. opens 4 bytes, 0xE0.. 3, 0xC0.. 2, else a character by itself
                pending = 3 if b >= 0xF0 else 2 if b >= 0xE0 else 1 if b >= 0xC0 else 0
                chars += pending == 0
    return offsets


def whole_characters(entries: list[dict], tokens: TokenBytes) -> int:
    """How many of `entries`, from the first, end on a whole UTF-8 character: the text holds a
    token only once the character it ends in is complete (serve.engine.detokenizer waits while
    the decoded text ends in U+FFFD), so the logprobs hold back the same tokens while a stream
    runs, and drop them when `max_tokens` cut that character, as the text does; the joined
    bytes of the logprobs are then always the text's. Only a character's last four bytes
    decide, so each step looks at the tail, not the whole output."""
    k = len(entries)
    while k > 0:
        tail, i = b"", k
        while i > 0 and len(tail) < 4:
            i -= 1
            tail = tokens.bytes(entries[i]["token_id"]) + tail
        if not tail.decode("utf-8", "replace").endswith("\ufffd"):
            return k
        k -= 1
    return 0


def released(c: CompletionOutput, streamed: bool, tokens: TokenBytes) -> list[dict]:
    """The generated tokens' logprob entries the answer carries: all whose text it holds (whole
    characters), or, in a stream chunk, those released since the previous chunk."""
    entries = c.logprobs or []
    end = whole_characters(entries, tokens)
    start = whole_characters(entries[: len(entries) - len(c.new_token_ids)], tokens) if streamed else 0
    return entries[start:end]


def completion_logprobs(
    c: CompletionOutput, streamed: bool, tokens: TokenBytes, prompt: list[dict] | None = None, echo_len: int = 0
) -> CompletionLogprobs:
    """The legacy completions format, for this step's tokens (`streamed`) or all of them,
    after the echoed prompt's tokens when given; text offsets count the echoed text (`echo_len`,
    or the prompt entries' own bytes). Tokens that hold part of a character are named by their
    escaped bytes (serve.engine.token_bytes); those of a character the text does not hold (yet)
    are left out (`released`)."""
    generated = c.logprobs or []
    entries = (prompt or []) + generated[: whole_characters(generated, tokens)]
    offsets = [(0 if prompt else echo_len) + o for o in _char_offsets(entries, tokens)]
    if streamed:  # this chunk: the prompt's entries (first chunk only) and the tokens released in this step
        keep = len(prompt or []), len(entries) - len(released(c, True, tokens))
        entries = entries[: keep[0]] + entries[keep[1] :]
        offsets = offsets[: keep[0]] + offsets[keep[1] :]
    return CompletionLogprobs(
        tokens=[tokens.text(e["token_id"]) for e in entries],
        token_logprobs=[e["logprob"] for e in entries],
        top_logprobs=[
            None if e["top"] is None else {tokens.text(t["token_id"]): t["logprob"] for t in e["top"]} for e in entries
        ],
        text_offset=offsets,
    )


def chat_logprobs(c: CompletionOutput, streamed: bool, tokens: TokenBytes) -> ChatLogprobs:
    """The chat format, for this step's tokens (`streamed`) or all of them: each token's own
    bytes, so the joined bytes are the content's UTF-8 even where a token splits a character
    (and a character the content does not hold is not in them either: `released`)."""
    entries = released(c, streamed, tokens)

    def top(t: dict) -> TopLogprob:
        return TopLogprob(
            token=tokens.text(t["token_id"]), logprob=t["logprob"], bytes=list(tokens.bytes(t["token_id"]))
        )

    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=tokens.text(e["token_id"]),
                logprob=e["logprob"],
                bytes=list(tokens.bytes(e["token_id"])),
                top_logprobs=[top(t) for t in e["top"]],
            )
            for e in entries
        ]
    )
