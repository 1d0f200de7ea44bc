"""The HTTP routes: each one hands its parsed body (FastAPI validates it against
serve.api.protocol), the request's id and its ASGI channel to the endpoint's plain function
over the app's ApiContext. The routes' names are the endpoints' (OpenAPI's operation ids)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve.api import chat as chat_api
from serve.api import completions as completions_api
from serve.api import embeddings as embeddings_api
from serve.api import score as score_api
from serve.api import status as status_api
from serve.api import tokenize as tokenize_api
from serve.api.context import ApiContext
from serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from serve.api.protocol_score import RerankRequest, ScoreRequest


def add_routes(app: FastAPI, ctx: ApiContext, guard, public_metrics: bool) -> None:
    """Every endpoint behind `guard` (serve.api.auth) but /health, and /metrics with `public_metrics`."""
    guarded = [guard]

    @app.get("/health")
    async def health() -> Response:
        return await status_api.health(ctx)

    @app.get("/metrics", dependencies=[] if public_metrics else guarded)
    async def prometheus() -> Response:
        return await status_api.prometheus(ctx)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return await status_api.models(ctx)

    @app.get("/v1/models/{model:path}", dependencies=guarded)  # :path: a served name may hold a slash (org/name)
    async def retrieve_model(model: str) -> dict:
        return await status_api.model(ctx, model)

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest) -> dict:
        return await embeddings_api.embeddings(ctx, body)

    @app.post("/v1/score", dependencies=guarded)
    async def score(body: ScoreRequest, request: Request) -> dict:
        return await score_api.score(ctx, body, request.state.request_id)

    @app.post("/v1/rerank", dependencies=guarded)
    async def rerank(body: RerankRequest, request: Request) -> dict:
        return await score_api.rerank(ctx, body, request.state.request_id)

    # the other paths vLLM serves them at (clients of vLLM, SGLang, Jina and Cohere post to one of
    # these); documented once, under /v1
    for path, endpoint in (("/score", score), ("/rerank", rerank), ("/v2/rerank", rerank)):
        app.add_api_route(path, endpoint, methods=["POST"], dependencies=guarded, include_in_schema=False)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> dict:
        return await tokenize_api.tokenize(ctx, body)

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> dict:
        return await tokenize_api.detokenize(ctx, body)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completions_api.completions(ctx, body, request.state.request_id, request.receive)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_api.chat_completions(ctx, body, request.state.request_id, request.receive)
