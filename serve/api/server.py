"""The OpenAI-compatible HTTP server: `build_app(backend)` -> a FastAPI app.

Endpoints: /v1/models (and /v1/models/{model}), /v1/completions, /v1/chat/completions (both streaming as server-sent
events), /v1/embeddings, /tokenize, /detokenize (vLLM's), /health, /metrics (Prometheus,
vLLM's names). Each is a plain function over the app's ApiContext (serve.api.context), in a
module of its own (chat, completions, embeddings, tokenize, status); serve.api.routes maps
the HTTP routes onto them.

Every generation request takes one path (serve.api.admission): check the model name,
tokenize (chat: the tokenizer's chat template), check the length against max_model_len,
validate the sampling values, submit. All of that happens before a byte is sent, so even a
stream's mistakes get proper statuses: 400 (bad input, naming the field), 413 (body over
--max-request-bytes), 404 (unknown model), 429 + Retry-After (queue full), 401 (API key), 503
(the engine has stopped). A client that goes away cancels its handler; closing the backend's
stream then aborts the request, freeing its slot and KV blocks for the next one. A request that
fails in the engine gets a 500 naming why (in-band once a stream has started); the engine goes
on with the others.

Nothing slow runs on the event loop, where it would stall every endpoint: tokenizing and chat
templates (bounded first by the prompt's length in characters, serve.api.limits) and grammar
compilation run in worker threads.
"""

from __future__ import annotations

from fastapi import FastAPI

from serve.api.auth import add_docs, authorizer
from serve.api.context import ApiContext
from serve.api.errors import install_error_handlers
from serve.api.limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware
from serve.api.openapi import install_openapi
from serve.api.request_id import RequestIdMiddleware
from serve.api.routes import add_routes
from serve.async_engine import Backend
from serve.embeddings import Embedder


def build_app(
    backend: Backend,
    api_key: str | None = None,
    chat_template: str | None = None,
    trust_request_chat_template: bool = False,
    embedder: Embedder | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    public_metrics: bool = False,
    hidden_metrics_version: tuple[int, int] | None = None,
) -> FastAPI:
    """The server for one backend. With `api_key`, every route but /health (and /metrics with
    `public_metrics`) needs `Authorization: Bearer <key>` (serve.api.auth).
    `chat_template` (Jinja text) replaces the tokenizer's; a request's own `chat_template` runs
    only with `trust_request_chat_template` (a template is code the server executes, sandboxed).
    `embedder` serves /v1/embeddings (serve.embeddings). `hidden_metrics_version` (vLLM's
    --show-hidden-metrics-for-version, as (major, minor)) serves the metric names vLLM had
    retired after that version (serve.api.metrics.RETIRED)."""
    app = FastAPI(title="ministack", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    ctx = ApiContext.create(backend, chat_template, trust_request_chat_template, embedder, hidden_metrics_version)
    app.state.backend, app.state.metrics, app.state.context = backend, ctx.metrics, ctx
    guard = authorizer(api_key)
    add_docs(app, guard)
    add_routes(app, ctx, guard, public_metrics)
    install_openapi(app, api_key=api_key is not None)
    return app
