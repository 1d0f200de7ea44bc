"""The server's own state: GET /health (for load balancers), /metrics (Prometheus, vLLM's
names: serve.api.metrics) and /v1/models (the served model, and the embedding model if any)."""

from __future__ import annotations

import time

from fastapi.responses import Response

from serve.api.context import ApiContext

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


async def health(ctx: ApiContext) -> Response:
    """200 while the engine serves, 503 once its step loop has died."""
    return Response(status_code=200 if ctx.backend.healthy() else 503)


async def prometheus(ctx: ApiContext) -> Response:
    return Response(ctx.metrics.render(ctx.backend.stats()), media_type=PROMETHEUS_TEXT)


async def models(ctx: ApiContext) -> dict:
    now = int(time.time())
    cards = [card(ctx.backend.model_name, ctx.backend.max_model_len, now)]
    if ctx.embedder is not None:
        cards.append(card(ctx.embedder.name, ctx.embedder.max_tokens, now))
    return {"object": "list", "data": cards}


def card(name: str, max_model_len: int, created: int) -> dict:
    """One model's entry in OpenAI's list (serve.api.openapi's ModelCard)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "ministack", "root": name, "max_model_len": max_model_len}
