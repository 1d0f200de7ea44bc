"""/v1/score and /v1/rerank on the shipped all-MiniLM-L6-v2: the scores are the cosine
similarities of the encoder's own embeddings (computed here text by text, outside the server),
ranked best first; a query about cats puts the cat sentences above tax law and the stock
market; every alias path answers the same; errors name their field.

The handlers are called as plain functions first, then over HTTP (httpx: the openai client has
no rerank method) on one live server for the whole module.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from test_serve_api import LiveServer, http, serve, smollm2, tiny_model  # noqa: F401 (fixtures)

from serve.api import build_app
from serve.api.context import ApiContext
from serve.api.errors import ApiError
from serve.api.protocol_score import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from serve.api.score import rerank, score
from serve.embeddings import Embedder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fuzz_api import CHECKS, CONFIG, negative_data_rejection, repaired  # noqa: E402

QUERY = "Tell me about cats."
DOCS = [
    "Income tax law sets the rates that companies pay.",
    "Cats are small furry pets that purr and chase mice.",
    "The stock market closed lower on Friday.",
    "A kitten is a young cat.",
]
CATS, TAX = {1, 3}, 0


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def server(tiny_model, embedder) -> Iterator[LiveServer]:  # noqa: F811
    live = serve(tiny_model, max_model_len=128, kv_cache_bytes=4 << 20, app_options={"embedder": embedder})
    yield live
    live.close()


@pytest.fixture(scope="module")
def ctx(server, embedder) -> ApiContext:
    return ApiContext.create(server.backend, embedder=embedder)


def cosines(embedder: Embedder, query: str, texts: list[str]) -> np.ndarray:
    """The query's cosine similarity to each text, each text embedded alone."""
    vectors = np.stack([embedder.embed([embedder.tokenizer(t)["input_ids"]])[0].numpy() for t in [query, *texts]])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit[1:] @ unit[0]


def tokens(embedder: Embedder, texts: list[str]) -> int:
    return sum(len(embedder.tokenizer(t)["input_ids"]) for t in texts)


def test_the_handlers_score_and_rank_without_http(ctx, embedder):
    expected = cosines(embedder, QUERY, DOCS)
    ranked = asyncio.run(rerank(ctx, RerankRequest(query=QUERY, documents=DOCS), "r1"))
    RerankResponse.model_validate(ranked)
    assert ranked["id"] == "rerank-r1" and ranked["model"] == "all-MiniLM-L6-v2"
    assert [r["index"] for r in ranked["results"]] == list(np.argsort(-expected))
    np.testing.assert_allclose([r["relevance_score"] for r in ranked["results"]], np.sort(expected)[::-1], atol=1e-5)
    assert {r["index"] for r in ranked["results"][:2]} == CATS  # the cat sentences above tax law and the markets
    assert [r["document"]["text"] for r in ranked["results"]] == [DOCS[r["index"]] for r in ranked["results"]]
    assert (
        ranked["usage"]["prompt_tokens"] == ranked["meta"]["tokens"]["input_tokens"] == tokens(embedder, [QUERY, *DOCS])
    )
    scored = asyncio.run(score(ctx, ScoreRequest(text_1=QUERY, text_2=DOCS), "s1"))
    ScoreResponse.model_validate(scored)
    np.testing.assert_allclose([d["score"] for d in scored["data"]], expected, atol=1e-5)
    assert scored["id"] == "score-s1" and [d["index"] for d in scored["data"]] == [0, 1, 2, 3]
    with pytest.raises(ApiError) as err:
        asyncio.run(score(ctx, ScoreRequest(text_1=DOCS[:2], text_2=DOCS[:3]), "s2"))
    assert (err.value.status, err.value.param) == (400, "text_2")
    with pytest.raises(ApiError) as err:
        asyncio.run(rerank(ctx, RerankRequest(model="bge-reranker", query=QUERY, documents=DOCS), "r2"))
    assert (err.value.status, err.value.param, err.value.code) == (404, "model", "model_not_found")


def test_rerank_over_http_top_n_documents_and_every_path(server, embedder):
    h = http(server)
    objects = [{"text": d} for d in DOCS]
    top = h.post(
        "/v1/rerank",
        json={"model": "all-MiniLM-L6-v2", "query": QUERY, "documents": objects, "top_n": 2, "return_documents": False},
        headers={"X-Request-Id": "q-7"},
    )
    assert top.status_code == 200, top.text
    body = top.json()
    assert body["id"] == "rerank-q-7" and len(body["results"]) == 2 and {r["index"] for r in body["results"]} == CATS
    assert all("document" not in r for r in body["results"])
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    full = h.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 10}).json()["results"]
    assert len(full) == 4 and full[-1]["relevance_score"] < full[0]["relevance_score"] - 0.3
    assert [r["index"] for r in full].index(TAX) > 1
    for path in ("/rerank", "/v2/rerank"):
        same = h.post(path, json={"query": QUERY, "documents": DOCS}).json()["results"]
        assert [r["index"] for r in same] == [r["index"] for r in full], path
        np.testing.assert_allclose(
            [r["relevance_score"] for r in same], [r["relevance_score"] for r in full], atol=1e-6
        )


def test_score_one_to_n_and_n_to_n_over_http(server, embedder):
    h = http(server)
    one_to_n = h.post("/v1/score", json={"model": "all-MiniLM-L6-v2", "text_1": [QUERY], "text_2": DOCS}).json()
    assert one_to_n["object"] == "list" and [d["object"] for d in one_to_n["data"]] == ["score"] * 4
    np.testing.assert_allclose([d["score"] for d in one_to_n["data"]], cosines(embedder, QUERY, DOCS), atol=1e-5)
    assert one_to_n["usage"]["prompt_tokens"] == tokens(embedder, [QUERY, *DOCS])  # the query embedded once
    pairs = [("A cat sleeps on the sofa.", "A kitten naps on the couch."), ("A cat sleeps on the sofa.", DOCS[0])]
    n_to_n = h.post("/score", json={"text_1": [a for a, _ in pairs], "text_2": [b for _, b in pairs]}).json()
    got = [d["score"] for d in n_to_n["data"]]
    np.testing.assert_allclose(got, [cosines(embedder, a, [b])[0] for a, b in pairs], atol=1e-5)
    assert got[0] > got[1] + 0.3
    single = h.post("/v1/score", json={"text_1": pairs[0][0], "text_2": pairs[0][1]}).json()["data"]
    assert len(single) == 1 and single[0]["score"] == pytest.approx(got[0], abs=1e-6)


def test_truncation_only_when_asked(server, embedder):
    h = http(server)
    long = "cat " * 400  # 402 tokens with [CLS] and [SEP]; the encoder reads 256
    refused = h.post("/v1/rerank", json={"query": QUERY, "documents": [DOCS[1], long]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents", refused.text
    assert "documents[1] has 402 tokens" in refused.json()["error"]["message"]
    cut = h.post("/v1/rerank", json={"query": QUERY, "documents": [DOCS[1], long], "truncate_prompt_tokens": -1}).json()
    assert cut["usage"]["prompt_tokens"] == tokens(embedder, [QUERY, DOCS[1]]) + embedder.max_tokens
    eight = h.post("/v1/score", json={"text_1": long, "text_2": [long, QUERY], "truncate_prompt_tokens": 8}).json()
    assert eight["usage"]["prompt_tokens"] == 8 + 8 + len(embedder.tokenizer(QUERY)["input_ids"])
    assert eight["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)  # the same first 8 tokens


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": "a"}, 400, "text_2"),
        ("/v1/score", {"text_1": "", "text_2": "a"}, 400, "text_1"),
        ("/v1/score", {"text_1": "a", "text_2": []}, 400, "text_2"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 2}, 400, "truncate_prompt_tokens"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 300}, 400, "truncate_prompt_tokens"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "model": "bge-reranker-v2-m3"}, 404, "model"),
        ("/v1/rerank", {"query": QUERY, "documents": []}, 400, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a", ""]}, 400, "documents"),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, 400, "query"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}, 400, "top_n"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": "2"}, 400, "top_n"),
        ("/v1/rerank", {"query": QUERY, "documents": [{"text": "a", "title": "b"}]}, 400, "documents.0.title"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "rank_fields": ["text"]}, 400, "rank_fields"),
        ("/v1/rerank", {"query": "word " * 300, "documents": ["a"]}, 400, "query"),
        ("/v2/rerank", {"query": QUERY, "documents": ["a"], "model": "rerank-v3.5"}, 404, "model"),
    ],
)
def test_errors_name_the_field(server, path, body, status, param):
    r = http(server).post(path, json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path", ["/v1/score", "/v1/rerank"])
def test_fuzzed_requests_get_documented_answers(server, embedder, path, mode):
    """As tests/test_serve_fuzz.py does for every route, here with the encoder served, so that
    valid requests reach it and their 200 bodies are checked against /openapi.json."""
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", build_app(server.backend, embedder=embedder), config=CONFIG
    )
    strategy = schema[path]["POST"].as_strategy(generation_mode=mode)
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(
        max_examples=20,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy.map(repaired) if mode is GenerationMode.POSITIVE else strategy)
    def fuzz(case) -> None:
        case.call_and_validate(checks=checks, timeout=30.0)

    fuzz()
