"""The server's own state: GET /health (for load balancers), /metrics (Prometheus, vLLM's
names: serve.api.metrics), /v1/models (the served model, and the embedding model if any) and
/v1/models/{model} (one of them, or OpenAI's 404)."""

from __future__ import annotations

import time

from fastapi.responses import Response

from serve.api.context import ApiContext
from serve.api.errors import ApiError

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


async def health(ctx: ApiContext) -> Response:
    """200 while the engine serves, 503 once its step loop has died."""
    return Response(status_code=200 if ctx.backend.healthy() else 503)


async def prometheus(ctx: ApiContext) -> Response:
    return Response(ctx.metrics.render(ctx.backend.stats()), media_type=PROMETHEUS_TEXT)


async def models(ctx: ApiContext) -> dict:
    return {"object": "list", "data": list(served(ctx).values())}


async def model(ctx: ApiContext, name: str) -> dict:
    """One served model's card (the client's `models.retrieve`); any other name is OpenAI's 404
    (`model_not_found`), so a client checking a name before use learns it is not served."""
    cards = served(ctx)
    if name not in cards:
        raise ApiError(
            404,
            f"The model `{name}` does not exist: this server serves {', '.join(f'`{n}`' for n in cards)} "
            "(GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    return cards[name]


def served(ctx: ApiContext) -> dict[str, dict]:
    """name -> card of every model this server answers for, the generating one first."""
    now = int(time.time())
    cards = [card(ctx.backend.model_name, ctx.backend.max_model_len, now)]
    if ctx.embedder is not None:
        cards.append(card(ctx.embedder.name, ctx.embedder.max_tokens, now))
    return {c["id"]: c for c in cards}


def card(name: str, max_model_len: int, created: int) -> dict:
    """One model's entry in OpenAI's list (serve.api.openapi's ModelCard)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "ministack",
        "root": name,
        "max_model_len": max_model_len,
    }
