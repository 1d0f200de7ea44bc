"""POST /v1/embeddings (OpenAI's): texts or token-id lists, one embedding each, from the
server's encoder (serve.embeddings), as floats or base64 of little-endian float32."""

from __future__ import annotations

import asyncio
import base64

from serve.api.context import ApiContext
from serve.api.errors import ApiError
from serve.api.protocol import EmbeddingRequest
from serve.embeddings import Embedder


def embedder_for(ctx: ApiContext, body: EmbeddingRequest) -> Embedder:
    """The encoder the request names (None: the served one); 404 where there is none such, 400
    for dimensions it does not have (its embeddings cannot be shortened)."""
    embedder = ctx.embedder
    if embedder is None or body.model not in (None, embedder.name):
        served = f"the embedding model is {embedder.name!r}" if embedder else "this server serves no embedding model"
        raise ApiError(404, f"The model `{body.model}` does not exist: {served}", param="model", code="model_not_found")
    if body.dimensions not in (None, embedder.dimensions):
        raise ApiError(
            400,
            f"dimensions: {embedder.name}'s embeddings have {embedder.dimensions} dimensions and cannot be shortened",
            param="dimensions",
        )
    return embedder


async def embeddings(ctx: ApiContext, body: EmbeddingRequest) -> dict:
    embedder = embedder_for(ctx, body)
    ids = await asyncio.to_thread(
        lambda: [embedder.tokenizer(x)["input_ids"] if isinstance(x, str) else x for x in body.inputs]
    )
    vocab = len(embedder.tokenizer)
    if any(t < 0 or t >= vocab for x in ids for t in x):
        raise ApiError(400, f"input: token ids must be in [0, {vocab})", param="input")
    try:
        vectors = await asyncio.to_thread(embedder.embed, ids)
    except ValueError as exc:
        raise ApiError(400, f"input: {exc}", param="input") from None
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": v.tolist()
            if body.encoding_format == "float"
            else base64.b64encode(v.numpy().astype("<f4").tobytes()).decode(),
        }
        for i, v in enumerate(vectors)
    ]
    tokens = sum(len(x) for x in ids)
    return {
        "object": "list",
        "data": data,
        "model": embedder.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
