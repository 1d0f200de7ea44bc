"""POST /v1/score and /v1/rerank on the server's sentence encoder (serve.embeddings).

The encoder is a bi-encoder: it embeds each text alone, so a pair's score is the cosine
similarity of the two embeddings, as vLLM scores with an embedding model (a cross-encoder
would read both texts at once; none is served here). Every text of a request is tokenized in
one call and embedded in one `Embedder.embed` call (its length-sorted batches), and a text
that appears once in the request (the query, a 1-to-N text_1) is embedded once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from serve.api.context import ApiContext
from serve.api.errors import ApiError
from serve.api.protocol_score import (
    DocumentText,
    MetaTokens,
    RerankMeta,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
)
from serve.embeddings import Embedder


@dataclass(frozen=True)
class Encoded:
    """A request's texts as the encoder saw them: one [texts, dimensions] tensor per request
    field, in the field's order, and the tokens all of them took."""

    vectors: dict[str, torch.Tensor]
    tokens: int


def served_embedder(ctx: ApiContext, model: str | None) -> Embedder:
    """The encoder `model` names (None: the served one); a 404 as /v1/embeddings answers where
    there is none such, so a client learns which model to ask for."""
    embedder = ctx.embedder
    if embedder is None or model not in (None, embedder.name):
        served = f"the embedding model is {embedder.name!r}" if embedder else "this server serves no embedding model"
        raise ApiError(404, f"The model `{model}` does not exist: {served}", param="model", code="model_not_found")
    return embedder


def token_limit(embedder: Embedder, truncate: int | None) -> int | None:
    """The length every text is cut to: None (no cut), the encoder's limit for -1, else
    `truncate`. A 400 for a cut past the encoder's limit (it cannot read more) or one that
    leaves no text between the special tokens (every text would score the same)."""
    if truncate is None:
        return None
    if truncate == -1:
        return embedder.max_tokens
    least = embedder.tokenizer.num_special_tokens_to_add() + 1
    if not least <= truncate <= embedder.max_tokens:
        raise ApiError(
            400,
            f"truncate_prompt_tokens: {embedder.name} takes {least} to {embedder.max_tokens} tokens "
            f"(or -1: its limit), got {truncate}",
            param="truncate_prompt_tokens",
        )
    return truncate


async def encode(embedder: Embedder, fields: dict[str, list[str]], limit: int | None) -> Encoded:
    """Embed the texts of every field in one call. A 400 naming the field of the first text over
    the encoder's limit, where the request did not ask for a cut (`limit` None)."""
    texts = [text for group in fields.values() for text in group]
    cut = {"truncation": True, "max_length": limit} if limit is not None else {}
    ids = await asyncio.to_thread(lambda: embedder.tokenizer(texts, **cut)["input_ids"])
    start = 0
    for name, group in fields.items():
        for i, tokens in enumerate(ids[start : start + len(group)]):
            if len(tokens) > embedder.max_tokens:
                which = name if len(group) == 1 else f"{name}[{i}]"
                raise ApiError(
                    400,
                    f"{name}: {which} has {len(tokens)} tokens; {embedder.name} takes at most "
                    f"{embedder.max_tokens} (truncate_prompt_tokens cuts longer texts)",
                    param=name,
                )
        start += len(group)
    vectors = await asyncio.to_thread(embedder.embed, ids)
    split = vectors.split([len(group) for group in fields.values()])
    return Encoded(dict(zip(fields, split)), sum(len(x) for x in ids))


def cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine similarity; a single row of `a` is scored against every row of `b`."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


async def score(ctx: ApiContext, body: ScoreRequest, request_id: str) -> dict:
    """vLLM's score response: one score per pair, indexed as text_2."""
    embedder = served_embedder(ctx, body.model)
    first, second = body.sides()
    encoded = await encode(
        embedder, {"text_1": first, "text_2": second}, token_limit(embedder, body.truncate_prompt_tokens)
    )
    scores = cosine(encoded.vectors["text_1"], encoded.vectors["text_2"])
    return ScoreResponse(
        id=f"score-{request_id}",
        created=int(time.time()),
        model=embedder.name,
        data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage=ScoreUsage(prompt_tokens=encoded.tokens, total_tokens=encoded.tokens),
    ).model_dump()


async def rerank(ctx: ApiContext, body: RerankRequest, request_id: str) -> dict:
    """The documents best first (a stable sort: equal scores keep the request's order), the
    first top_n of them."""
    embedder = served_embedder(ctx, body.model)
    texts = body.texts
    encoded = await encode(
        embedder, {"query": [body.query], "documents": texts}, token_limit(embedder, body.truncate_prompt_tokens)
    )
    scores = cosine(encoded.vectors["query"], encoded.vectors["documents"])
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: body.top_n]
    results = [
        RerankResult(
            index=i, relevance_score=scores[i], document=DocumentText(text=texts[i]) if body.return_documents else None
        )
        for i in order
    ]
    usage = ScoreUsage(prompt_tokens=encoded.tokens, total_tokens=encoded.tokens)
    response = RerankResponse(
        id=f"rerank-{request_id}",
        model=embedder.name,
        results=results,
        usage=usage,
        meta=RerankMeta(tokens=MetaTokens(input_tokens=encoded.tokens)),
    )
    return response.model_dump(exclude_none=True)
