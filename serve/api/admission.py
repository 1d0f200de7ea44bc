"""The one way a generation request reaches the engine, once pydantic has checked its body
(serve.api.protocol): the served model's name, each prompt against the context (its
max_tokens resolved), the sampling settings by the engine's own check (SamplingParams.validate,
with the vocabulary) and a structured output by the backend's grammar engine, then submission.
All of it happens before a byte is sent, so even a stream's mistakes get proper statuses, and a
refusal always names its field (`param`), carried as data from where the check is made."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serve.api.context import ApiContext
from serve.api.errors import ApiError, refused
from serve.api.metrics import observed
from serve.async_engine import EngineDead, Overloaded
from serve.engine.outputs import RequestOutput
from serve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request, as the engine gets it, and the request field it came from."""

    ids: list[int]
    field: str  # prompt, prompt.1, messages, tokens: what an error about it names


def check_model(ctx: ApiContext, name: str | None) -> None:
    """404 for a model this server does not serve (None: the served one)."""
    if name is not None and name != ctx.backend.model_name:
        raise ApiError(
            404,
            f"The model `{name}` does not exist: this server serves `{ctx.backend.model_name}` (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def room(ctx: ApiContext, prompt: Prompt, max_tokens: int | None) -> int:
    """The request's max_tokens (None: all the room the context leaves); 400 if the prompt's ids
    are not the vocabulary's or it cannot fit."""
    limit, vocab, n = ctx.backend.max_model_len, ctx.vocab_size, len(prompt.ids)
    if any(not 0 <= t < vocab for t in prompt.ids):
        raise ApiError(400, f"{prompt.field}: token ids must lie in [0, {vocab})", param=prompt.field)
    if n >= limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{n} input tokens. Please reduce the length of the {prompt.field}.",
            param=prompt.field,
        )
    if max_tokens is None:
        return limit - n
    if n + max_tokens > limit:
        raise ApiError(
            400,
            f"max_tokens is too large: {max_tokens}. This model's maximum context length is {limit} tokens "
            f"and your request has {n} input tokens.",
            param="max_tokens",
        )
    return max_tokens


async def validated(ctx: ApiContext, params: SamplingParams, structured_field: str | None) -> SamplingParams:
    """`params`, once the engine's check passes them (400 naming the setting) and the backend can
    enforce their structured output (400 naming `structured_field`; compiled in a worker thread:
    it can take a second)."""
    try:
        params.validate(ctx.vocab_size)
    except ValueError as exc:
        raise refused(exc) from None
    if params.structured is not None:
        try:
            await asyncio.to_thread(ctx.backend.check_structured, params.structured)
        except ValueError as exc:
            raise ApiError(400, f"{structured_field}: {exc}", param=structured_field) from None
    return params


async def submit(
    ctx: ApiContext, requests: list[tuple[str, list[int], SamplingParams]]
) -> list[AsyncIterator[RequestOutput]]:
    """Hand each (request id, prompt, checked params) to the backend: all of them, or, when
    one is refused (429 queue full, 503 engine stopped), none (those already queued are
    aborted). Each stream is timed into the metrics."""
    streams: list = []
    try:
        for request_id, prompt_ids, params in requests:
            streams.append(ctx.backend.generate(request_id, prompt_ids, params))
    except BaseException as exc:
        for stream in streams:
            await stream.aclose()
        if isinstance(exc, Overloaded):
            raise ApiError(
                429,
                str(exc),
                type="rate_limit_error",
                code="engine_overloaded",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        if isinstance(exc, EngineDead):
            raise ApiError(503, str(exc), type="server_error", code="engine_unavailable") from None
        raise
    arrival = time.perf_counter()
    return [observed(ctx.metrics, stream, arrival) for stream in streams]


async def admit(
    ctx: ApiContext,
    request_id: str,
    prompts: list[Prompt],
    max_tokens: int | None,
    sampling: Callable[[int], SamplingParams],
    structured_field: str | None,
) -> list[AsyncIterator[RequestOutput]]:
    """Every prompt checked against the context, then each one's SamplingParams (`sampling` of
    its max_tokens) checked, then all submitted: one stream per prompt, named `request_id`
    (`request_id-i` in a batch). Nothing is queued unless everything passed."""
    limits = [room(ctx, prompt, max_tokens) for prompt in prompts]
    params = [await validated(ctx, sampling(limit), structured_field) for limit in limits]
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    return await submit(ctx, [(i, prompt.ids, p) for i, prompt, p in zip(ids, prompts, params)])
