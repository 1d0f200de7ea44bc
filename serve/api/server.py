"""The OpenAI-compatible HTTP server: `build_app(backend)` -> a FastAPI app.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both streaming as server-sent
events), /tokenize, /detokenize (vLLM's), /health, /metrics (Prometheus, vLLM's names).

Every request takes one path: check the model name, tokenize (chat: the tokenizer's chat
template), check the length against max_model_len, validate the sampling values, submit.
All of that happens before a byte is sent, so even a stream's mistakes get proper statuses:
400 (bad input, naming the field), 413 (body over --max-request-bytes), 404 (unknown model),
429 + Retry-After (queue full), 401 (API key), 503 (the engine has stopped). A client that goes
away cancels its handler; closing the backend's stream then aborts the request, freeing its
slot and KV blocks for the next one. A request that fails in the engine gets a 500 naming why
(in-band once a stream has started); the engine goes on with the others.

Nothing slow runs on the event loop, where it would stall every endpoint: tokenizing and chat
templates (bounded first by the prompt's length in characters, serve.api.limits) and grammar
compilation run in worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api.auth import add_docs, authorizer
from serve.api.metrics import ServingMetrics, request_phases
from serve.api.openapi import install_openapi
from serve.api.request_id import RequestIdMiddleware
from serve.api.streams import final_outputs, listed, merged_outputs, sse_response, until_disconnect
from serve.api.outputs import batch_usage, chat_logprobs, completion_logprobs, prompt_logprob_entries
from serve.api.errors import ApiError, field_name, refused
from serve.api.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware, check_prompt_chars, longest_token_bytes
from serve.api.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest, template_messages,
)
from serve.api.responses import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, ChatResponseMessage,
    CompletionChoice, CompletionResponse, ResponseToolCall, Usage,
)
from serve.api.tools import ToolStream, parse_tool_calls, render_messages, tool_grammar
from serve.async_engine import Backend, EngineDead, Overloaded
from serve.embeddings import Embedder
from serve.engine.outputs import CompletionOutput, RequestOutput
from serve.engine.sampling_params import SamplingParams
from serve.engine.token_bytes import TokenBytes



def build_app(backend: Backend, api_key: str | None = None, chat_template: str | None = None,
              trust_request_chat_template: bool = False, embedder: Embedder | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, public_metrics: bool = False) -> FastAPI:
    """The server for one backend. With `api_key`, every route but /health (and /metrics with
    `public_metrics`) needs `Authorization: Bearer <key>` (serve.api.auth).
    `chat_template` (Jinja text) replaces the tokenizer's; a request's own `chat_template` runs
    only with `trust_request_chat_template` (a template is code the server executes, sandboxed).
    `embedder` serves /v1/embeddings (serve.embeddings)."""
    app = FastAPI(title="ministack", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    metrics = ServingMetrics(backend.model_name, backend.max_model_len)
    token_bytes = TokenBytes(backend.tokenizer)  # logprobs' token text and bytes, from the vocabulary
    longest = longest_token_bytes(token_bytes, len(backend.tokenizer))  # the prompt-length bound's unit
    app.state.backend, app.state.metrics = backend, metrics

    # ---- errors: always OpenAI's {"error": {...}} body ---------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # a union field (content: str | list of parts) fails once per member: the deepest error is the one that explains
        err = max(exc.errors(), key=lambda e: len(e["loc"]))
        if err["type"] == "json_invalid":
            error = ApiError(400, f"invalid JSON in the request body: {err.get('ctx', {}).get('error', err['msg'])}")
        else:
            param = field_name(tuple(err["loc"]))
            if err["type"] == "extra_forbidden":  # fail closed: never a 200 that ignored what was asked
                error = ApiError(400, f"{param}: not supported by this server (the README's serve section lists "
                                      "every accepted field)", param=param, code="unsupported_parameter")
            else:
                error = ApiError(400, f"{param or 'body'}: {err['msg']}", param=param)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        error = ApiError(500, f"internal error: {exc!r}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    guard = authorizer(api_key)
    guarded = [guard]
    add_docs(app, guard)

    # ---- shared request path -----------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != backend.model_name:
            raise ApiError(404, f"The model `{name}` does not exist: this server serves `{backend.model_name}` (GET /v1/models)",
                           param="model", code="model_not_found")

    async def tokenized(texts: list[str], field: str, encode: Callable[[], list[list[int]]]) -> list[list[int]]:
        """`encode()` run in a worker thread, once `texts` are known to be short enough to fit
        (400 naming `field` otherwise, before any tokenizing)."""
        try:
            check_prompt_chars(texts, backend.max_model_len, longest, field)
        except ValueError as exc:
            raise ApiError(400, str(exc), param=field) from None
        return await asyncio.to_thread(encode)

    def check_prompt(prompt_ids: list[int], max_tokens: int | None, prompt_field: str) -> int:
        """The request's max_tokens (default: all the room left); 400 if it cannot fit."""
        limit = backend.max_model_len
        vocab = len(backend.tokenizer)
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ApiError(400, f"{prompt_field}: token ids must lie in [0, {vocab})", param=prompt_field)
        if len(prompt_ids) >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                                f"{len(prompt_ids)} input tokens. Please reduce the length of the {prompt_field}.", param=prompt_field)
        if max_tokens is None:
            return limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit:
            raise ApiError(400, f"max_tokens is too large: {max_tokens}. This model's maximum context length is {limit} tokens "
                                f"and your request has {len(prompt_ids)} input tokens.", param="max_tokens")
        return max_tokens

    async def checked(params: SamplingParams, structured_field: str | None = None) -> SamplingParams:
        """`params`, once valid: 400 for bad sampling values or a structured output the backend
        cannot enforce (compiled in a worker thread: it can take a second)."""
        try:
            params.validate(len(backend.tokenizer))
        except ValueError as exc:
            raise refused(exc) from None
        if params.structured is not None:
            try:
                await asyncio.to_thread(backend.check_structured, params.structured)
            except ValueError as exc:
                raise ApiError(400, f"{structured_field}: {exc}", param=structured_field) from None
        return params

    async def submit(requests: list[tuple[str, list[int], SamplingParams]]) -> list[AsyncIterator[RequestOutput]]:
        """Hand each (request id, prompt, checked params) to the backend: all of them, or, when
        one is refused (429 queue full, 503 engine stopped), none (those already queued are
        aborted)."""
        streams: list = []
        try:
            for request_id, prompt_ids, params in requests:
                streams.append(backend.generate(request_id, prompt_ids, params))
        except BaseException as exc:
            for stream in streams:
                await stream.aclose()
            if isinstance(exc, Overloaded):
                raise ApiError(429, str(exc), type="rate_limit_error", code="engine_overloaded",
                               headers={"Retry-After": str(exc.retry_after)}) from None
            if isinstance(exc, EngineDead):
                raise ApiError(503, str(exc), type="server_error", code="engine_unavailable") from None
            raise
        arrival = time.perf_counter()
        return [observed(stream, arrival) for stream in streams]

    async def observed(outputs: AsyncGenerator[RequestOutput, None], arrival: float) -> AsyncIterator[RequestOutput]:
        """The backend's stream, timing its tokens into the metrics; closed with it. A stream
        closed before its end (the client left) is counted as aborted."""
        last, finished = None, False
        async with aclosing(outputs):
            try:
                async for output in outputs:
                    now = time.perf_counter()
                    new = max(len(c.new_token_ids) for c in output.outputs)
                    if new:
                        if last is None:
                            metrics.observe_first_token(now - arrival)
                        else:
                            metrics.observe_inter_token(now - last, new)
                        last = now
                    if output.finished:
                        finished, m = True, output.metrics
                        reason = next((c.finish_reason for c in output.outputs if c.finish_reason), "stop")
                        metrics.observe_finished(now - arrival, len(output.prompt_token_ids),
                                                 sum(len(c.token_ids) for c in output.outputs), reason, m.measured_flops, m.law_flops,
                                                 request_phases(m))
                    yield output
            except (GeneratorExit, asyncio.CancelledError):  # the client left; closing the backend's stream aborts the request
                if not finished:
                    metrics.observe_aborted()
                raise

    # ---- endpoints ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if backend.healthy() else 503)

    @app.get("/metrics", dependencies=[] if public_metrics else guarded)
    async def prometheus() -> Response:
        return Response(metrics.render(backend.stats()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        now = int(time.time())
        cards = [{"id": backend.model_name, "object": "model", "created": now, "owned_by": "ministack",
                  "root": backend.model_name, "max_model_len": backend.max_model_len}]
        if embedder is not None:
            cards.append({"id": embedder.name, "object": "model", "created": now, "owned_by": "ministack",
                          "root": embedder.name, "max_model_len": embedder.max_tokens})
        return {"object": "list", "data": cards}

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest) -> dict:
        if embedder is None or body.model not in (None, embedder.name):
            served = f"the embedding model is {embedder.name!r}" if embedder else "this server serves no embedding model"
            raise ApiError(404, f"The model `{body.model}` does not exist: {served}", param="model", code="model_not_found")
        if body.dimensions not in (None, embedder.dimensions):
            raise ApiError(400, f"dimensions: {embedder.name}'s embeddings have {embedder.dimensions} dimensions and "
                                "cannot be shortened", param="dimensions")
        ids = await asyncio.to_thread(lambda: [embedder.tokenizer(x)["input_ids"] if isinstance(x, str) else x for x in body.inputs])
        vocab = len(embedder.tokenizer)
        if any(t < 0 or t >= vocab for x in ids for t in x):
            raise ApiError(400, f"input: token ids must be in [0, {vocab})", param="input")
        try:
            vectors = await asyncio.to_thread(embedder.embed, ids)
        except ValueError as exc:
            raise ApiError(400, f"input: {exc}", param="input") from None
        data = [{"object": "embedding", "index": i, "embedding": v.tolist() if body.encoding_format == "float"
                 else base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()} for i, v in enumerate(vectors)]
        tokens = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        if body.messages is not None:
            ids = await chat_prompt_ids(body, body.tool_dicts())
        else:
            (ids,) = await tokenized([body.prompt], "prompt",
                                     lambda: [backend.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)])
        return {"count": len(ids), "max_model_len": backend.max_model_len, "tokens": ids,
                "token_strs": backend.tokenizer.convert_ids_to_tokens(ids)}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        check_prompt(body.tokens, 0, "tokens")
        return {"prompt": backend.tokenizer.decode(body.tokens)}

    async def chat_prompt_ids(body: ChatCompletionRequest | TokenizeRequest, tools: list[dict] | None = None) -> list[int]:
        """The messages (and `tools`, serve.api.tools) rendered by the request's template, else
        the server's (--chat-template), else the tokenizer's; 400 naming the field for what
        cannot be rendered."""
        if body.chat_template is not None and not trust_request_chat_template:
            raise ApiError(400, "chat_template: this server does not run templates sent with a request "
                                "(start it with --trust-request-chat-template)", param="chat_template")
        template = body.chat_template or chat_template or backend.tokenizer.chat_template
        if template is None:
            raise ApiError(400, "this model's tokenizer has no chat template: send the prompt to /v1/completions, or start "
                                "the server with --chat-template FILE", param="messages")
        if body.continue_final_message and body.add_generation_prompt:
            raise ApiError(400, "continue_final_message continues the last message in place: set add_generation_prompt "
                                "to false", param="continue_final_message")
        if body.continue_final_message and body.messages[-1].role != "assistant":
            raise ApiError(400, "continue_final_message needs an assistant message last", param="continue_final_message")
        reserved = {"conversation", "messages", "chat_template", "add_generation_prompt", "continue_final_message",
                    "tokenize", "tools", "documents"} & set(body.chat_template_kwargs or {})
        if reserved:
            raise ApiError(400, f"chat_template_kwargs: {sorted(reserved)} are set by the request itself",
                           param="chat_template_kwargs")
        messages, extra = render_messages(template_messages(body.messages), tools, template)

        def encode() -> list[list[int]]:
            try:
                text = backend.tokenizer.apply_chat_template(
                    messages, chat_template=template, add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=body.continue_final_message, tokenize=False, **extra, **(body.chat_template_kwargs or {}))
            except Exception as exc:  # noqa: BLE001 - chat templates raise whatever jinja raises
                raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None
            return [backend.tokenizer.encode(text, add_special_tokens=False)]

        (ids,) = await tokenized([m["content"] or "" for m in messages], "messages", encode)
        return ids

    async def respond(
        request: Request, body: CompletionRequest | ChatCompletionRequest, outputs: AsyncIterator[RequestOutput],
        want_logprobs: bool, chunk: Callable[[list[CompletionOutput]], BaseModel | list[BaseModel]],
        whole: Callable[[list[CompletionOutput], Usage], BaseModel], opening: BaseModel | None = None,
    ) -> Response:
        """Both endpoints' two ways to answer, for one request or a batch merged into one
        stream. Streaming: `opening` (if any), then `chunk` (one or a list) of the completions
        that changed in each step, then (include_usage) an empty chunk with the usage.
        Otherwise: `whole` of every final completion and the usage, once all requests finished."""
        if body.stream:
            async def events() -> AsyncIterator[BaseModel]:
                if opening is not None:
                    yield opening
                finals: dict[str, RequestOutput] = {}
                ended: set[tuple[str, int]] = set()  # choices whose finish was sent: later outputs of the request repeat them
                async for out in outputs:
                    finals[out.request_id] = out
                    changed = [c for c in out.outputs if (out.request_id, c.index) not in ended
                               and (c.new_text or c.finish_reason or (want_logprobs and c.new_token_ids))]
                    ended.update((out.request_id, c.index) for c in changed if c.finish_reason)
                    for event in listed(chunk(changed)) if changed else []:
                        if body.continuous_usage:  # the usage so far on every chunk (vLLM's continuous_usage_stats)
                            event = event.model_copy(update={"usage": batch_usage(list(finals.values()))})
                        yield event
                if body.include_usage:
                    (closing,) = listed(chunk([]))
                    yield closing.model_copy(update={"usage": batch_usage(list(finals.values()))})
            return sse_response(events(), include_usage=body.include_usage)
        finals = await until_disconnect(request, final_outputs(outputs))
        if finals is None:  # the client left: nobody to answer (nginx's 499), no traceback, counted as aborted
            return Response(status_code=499)
        return JSONResponse(whole(sorted((c for f in finals for c in f.outputs), key=lambda c: c.index), batch_usage(finals)).model_dump())

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        batch = body.prompts
        field = "prompt" if len(batch) == 1 else "prompt.{}"
        texts = [p for p in batch if isinstance(p, str)]
        encoded = iter(await tokenized(texts, "prompt", lambda: [backend.tokenizer.encode(p) for p in texts]) if texts else [])
        prompt_ids = [body.truncated(p if isinstance(p, list) else next(encoded)) for p in batch]
        max_tokens = [check_prompt(ids, body.max_tokens, field.format(i)) for i, ids in enumerate(prompt_ids)]
        request_id, model, want_logprobs = f"cmpl-{request.state.request_id}", backend.model_name, body.logprobs is not None
        # echo: each choice's text begins with its prompt's (OpenAI's rule for legacy completions),
        # and with logprobs its logprobs begin with the prompt tokens' (the first one's null)
        echoed = [p if isinstance(p, str) else backend.tokenizer.decode(p) for p in batch] if body.echo else None
        prompt_logprobs = body.logprobs if echoed and want_logprobs else None
        # one SamplingParams per prompt (each prompt's max_tokens), checked before any is queued
        params = [await checked(body.sampling_params(m, body.logprobs, prompt_logprobs, backend.sampling_defaults), body.structured_field())
                  for m in max_tokens]
        streams = await submit([(f"{request_id}-{i}" if len(batch) > 1 else request_id, ids, p)
                                for i, (ids, p) in enumerate(zip(prompt_ids, params))])
        prompt_entries: dict[int, list[dict]] = {}  # prompt index -> its tokens' entries, as they arrive

        def choice(c: CompletionOutput, streamed: bool) -> CompletionChoice:
            i = c.index // body.n
            # the echo leads the whole text, or, streamed with logprobs, the choice's first chunk
            # (the prompt's logprobs exist only once its prefill has run)
            first_chunk = streamed and prompt_logprobs is not None and len(c.token_ids) == len(c.new_token_ids)
            prefix = echoed[i] if echoed and (not streamed or first_chunk) else ""
            lp = None
            if want_logprobs:
                prompt = prompt_entries.get(i) if prefix and prompt_logprobs is not None else None
                lp = completion_logprobs(c, streamed, token_bytes, prompt, len(echoed[i]) if prompt_logprobs is not None else 0)
            return CompletionChoice(index=c.index, text=prefix + (c.new_text if streamed else c.text), finish_reason=c.finish_reason, logprobs=lp)

        async def noting_prompt_logprobs(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
            async with aclosing(outputs):
                async for out in outputs:
                    if out.prompt_logprobs is not None and out.outputs:
                        prompt_entries.setdefault(out.outputs[0].index // body.n, prompt_logprob_entries(out))
                    yield out

        opening = None
        if echoed and body.stream and prompt_logprobs is None:
            opening = CompletionResponse(id=request_id, model=model, choices=[
                CompletionChoice(index=i * body.n + j, text=text) for i, text in enumerate(echoed) for j in range(body.n)])
        return await respond(
            request, body, noting_prompt_logprobs(merged_outputs(streams, body.n)), want_logprobs,
            chunk=lambda cs: CompletionResponse(id=request_id, model=model, choices=[choice(c, True) for c in cs]),
            whole=lambda cs, usage: CompletionResponse(id=request_id, model=model, choices=[choice(c, False) for c in cs], usage=usage),
            opening=opening,
        )

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        mode = body.tool_mode()  # None, "none", "auto", "required" or a function's name
        tools = body.tool_dicts() if mode not in (None, "none") else None
        prompt_ids = body.truncated(await chat_prompt_ids(body, tools))
        max_tokens = check_prompt(prompt_ids, body.requested_max_tokens, "messages")
        request_id, model, want_logprobs = f"chatcmpl-{request.state.request_id}", backend.model_name, body.logprobs
        params, field = body.sampling_params(max_tokens, body.num_logprobs, None, backend.sampling_defaults), body.structured_field()
        forced = mode not in (None, "none", "auto")  # required or named: the grammar writes the calls
        if forced:
            try:
                params.structured = tool_grammar(tools, None if mode == "required" else mode, body.parallel_tool_calls)
            except ValueError as exc:
                raise ApiError(400, str(exc), param="tools") from None
            field = "tool_choice"
        (outputs,) = await submit([(request_id, prompt_ids, await checked(params, field))])
        streams = {i: ToolStream() for i in range(body.n)} if tools else None

        def calls_in(calls: list[dict], c: CompletionOutput) -> tuple[list[dict], str | None]:
            calls = calls if body.parallel_tool_calls else calls[:1]
            return calls, ("tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason)

        def deltas(c: CompletionOutput) -> list[ChatChunkChoice]:
            lp = chat_logprobs(c, True, token_bytes) if want_logprobs else None
            if streams is None:
                return [ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.new_text or None), finish_reason=c.finish_reason, logprobs=lp)]
            text = streams[c.index].content(c.new_text)
            if not c.finish_reason:
                return [ChatChunkChoice(index=c.index, delta=ChatDelta(content=text), logprobs=lp)] if text or lp else []
            rest, found = streams[c.index].finish()
            calls, reason = calls_in(found, c)
            out = [ChatChunkChoice(index=c.index, delta=ChatDelta(content=text + rest), logprobs=lp)] if text + rest or lp else []
            for i, call in enumerate(calls):  # OpenAI's shape: id, type and name first, then the arguments
                opening = {"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
                out += [ChatChunkChoice(index=c.index, delta=ChatDelta(tool_calls=[opening])),
                        ChatChunkChoice(index=c.index, delta=ChatDelta(tool_calls=[{"index": i, "function": {"arguments": call["function"]["arguments"]}}]))]
            return out + [ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=reason)]

        def chunks(cs: list[CompletionOutput]) -> list[ChatCompletionChunk]:
            if streams is None or not cs:
                return [ChatCompletionChunk(id=request_id, model=model, choices=[d for c in cs for d in deltas(c)])]
            return [ChatCompletionChunk(id=request_id, model=model, choices=[d]) for c in cs for d in deltas(c)]

        def choice(c: CompletionOutput) -> ChatChoice:
            lp = chat_logprobs(c, False, token_bytes) if want_logprobs else None
            if streams is None:
                return ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason, logprobs=lp)
            content, found = parse_tool_calls(c.text)
            calls, reason = calls_in(found, c)
            message = ChatResponseMessage(content=content, tool_calls=[ResponseToolCall(**call) for call in calls] or None)
            return ChatChoice(index=c.index, message=message, finish_reason=reason, logprobs=lp)

        # a forced tool call has no content: null from the first chunk, as OpenAI streams it (and as the whole answer says)
        opening = [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=None if forced else "")) for i in range(body.n)]
        return await respond(
            request, body, outputs, want_logprobs, chunk=chunks,
            whole=lambda cs, usage: ChatCompletionResponse(id=request_id, model=model, choices=[choice(c) for c in cs], usage=usage),
            opening=ChatCompletionChunk(id=request_id, model=model, choices=opening),
        )

    install_openapi(app, api_key=api_key is not None)
    return app
