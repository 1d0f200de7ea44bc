"""How answers leave the server: streams of engine outputs merged, awaited until the client
leaves, or sent as server-sent events; `respond` picks the way a request asked for."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive

from serve.api.errors import ApiError, refused
from serve.api.outputs import batch_usage
from serve.api.protocol import ChatCompletionRequest, CompletionRequest
from serve.api.responses import Usage
from serve.async_engine import EngineDead, QueueTimeout, RequestFailed
from serve.engine.outputs import CompletionOutput, RequestOutput


def listed(events: BaseModel | list[BaseModel]) -> list[BaseModel]:
    return events if isinstance(events, list) else [events]


async def final_outputs(outputs: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    """The last output of each request in the stream."""
    finals: dict[str, RequestOutput] = {}
    async for out in outputs:
        finals[out.request_id] = out
    return list(finals.values())


async def merged_outputs(streams: list[AsyncIterator[RequestOutput]], n: int) -> AsyncIterator[RequestOutput]:
    """A batch of prompts' streams as one, in the order outputs arrive, each choice re-indexed
    prompt * n + choice. Closing it (a disconnect) closes every stream, aborting its request;
    one stream's error (a refused prompt) ends them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]):
            async for out in streams[0]:
                yield out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for out in stream:
                    queue.put_nowait(replace(out, outputs=[replace(c, index=i * n + c.index) for c in out.outputs]))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(exc)
        queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnect(receive: Receive, work: Awaitable[list[RequestOutput]]) -> list[RequestOutput] | None:
    """Await `work` unless the client disconnects first (a disconnect arrives on the request's
    ASGI channel, `receive`); then cancel it (which aborts the request) and return None."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task  # let the cancellation run its course (the backend stream closes, the request aborts)
        return None
    try:
        return task.result()
    except (ValueError, RuntimeError) as exc:
        raise request_error(exc) from None


def request_error(exc: ValueError | RuntimeError) -> ApiError:
    """What a request's stream ended with, as the error the client gets: 400 the engine refused
    it (naming the field a ParamError carries), 503 + Retry-After it waited past the queue
    deadline, 503 the engine has stopped, 500 it failed on its own (RequestFailed: the reason)
    or for a reason unforeseen."""
    if isinstance(exc, ValueError):
        return refused(exc)
    if isinstance(exc, QueueTimeout):
        return ApiError(
            503, str(exc), type="server_error", code="queue_timeout", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, EngineDead):
        return ApiError(503, str(exc), type="server_error", code="engine_unavailable")
    code = "request_failed" if isinstance(exc, RequestFailed) else None
    return ApiError(500, f"the request failed: {exc}", type="server_error", code=code)


def sse_response(events: AsyncIterator[BaseModel], include_usage: bool) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. With include_usage,
    every chunk carries "usage": null except the last, which carries the totals (OpenAI's rule).
    An error after the stream started is sent as an `{"error": ...}` event, as vLLM does."""

    async def encode() -> AsyncIterator[str]:
        try:
            async for event in events:
                data = event.model_dump(exclude={"usage"} if not include_usage else set())
                yield f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        except (ValueError, RuntimeError) as exc:  # refused or failed after the headers went out: say so in-band
            yield f"data: {json.dumps(request_error(exc).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


Chunk = Callable[[list[CompletionOutput]], BaseModel | list[BaseModel]]


async def respond(
    receive: Receive,
    body: CompletionRequest | ChatCompletionRequest,
    outputs: AsyncIterator[RequestOutput],
    want_logprobs: bool,
    chunk: Chunk,
    whole: Callable[[list[CompletionOutput], Usage], BaseModel],
    opening: BaseModel | None = None,
) -> Response:
    """Both generation endpoints' two ways to answer, for one request or a batch merged into
    one stream. Streaming: server-sent `chunk_events`. Otherwise: `whole` of every final
    completion and the usage, once all requests finished (499, no body, if the client left first)."""
    if body.stream:
        return sse_response(
            chunk_events(body, outputs, want_logprobs, chunk, opening), include_usage=body.include_usage
        )
    finals = await until_disconnect(receive, final_outputs(outputs))
    if finals is None:  # the client left: nobody to answer (nginx's 499), no traceback, counted as aborted
        return Response(status_code=499)
    return JSONResponse(
        whole(sorted((c for f in finals for c in f.outputs), key=lambda c: c.index), batch_usage(finals)).model_dump()
    )


async def chunk_events(
    body: CompletionRequest | ChatCompletionRequest,
    outputs: AsyncIterator[RequestOutput],
    want_logprobs: bool,
    chunk: Chunk,
    opening: BaseModel | None,
) -> AsyncIterator[BaseModel]:
    """`opening` (if any), then `chunk` (one or a list) of the completions that changed in each
    step, then (include_usage) an empty chunk with the usage; continuous_usage_stats (vLLM's)
    puts the usage so far on every chunk."""
    if opening is not None:
        yield opening
    finals: dict[str, RequestOutput] = {}
    ended: set[tuple[str, int]] = set()  # choices whose finish was sent: later outputs of the request repeat them
    async for out in outputs:
        finals[out.request_id] = out
        changed = [
            c
            for c in out.outputs
            if (out.request_id, c.index) not in ended
            and (c.new_text or c.finish_reason or (want_logprobs and c.new_token_ids))
        ]
        ended.update((out.request_id, c.index) for c in changed if c.finish_reason)
        for event in listed(chunk(changed)) if changed else []:
            if body.continuous_usage:
                event = event.model_copy(update={"usage": batch_usage(list(finals.values()))})
            yield event
    if body.include_usage:
        (closing,) = listed(chunk([]))
        yield closing.model_copy(update={"usage": batch_usage(list(finals.values()))})
