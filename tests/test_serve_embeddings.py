"""/v1/embeddings with the shipped all-MiniLM-L6-v2, through the official `openai` client:
the vectors equal an independent transformers mean-pool + normalise, alone or batched, as
floats or base64; errors name their field."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
from test_serve_api import LiveServer, http, serve, smollm2, tiny_model  # noqa: F401 (fixtures)

from profiling.shipped import minilm_dir
from serve.embeddings import Embedder

TEXTS = [
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by four percent.",
    "short",
    "a much longer sentence " * 10,
]


@pytest.fixture(scope="module")
def server(tiny_model):
    live = serve(tiny_model, max_model_len=256, kv_cache_bytes=4 << 20, app_options={"embedder": Embedder()})
    yield live
    live.close()


@torch.no_grad()
def reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe for this model, written out: mean of the token states
    under the attention mask, then L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def test_embeddings_match_the_reference_alone_and_batched(server):
    client = server.client()
    assert "all-MiniLM-L6-v2" in [m.id for m in client.models.list().data]
    assert client.models.retrieve("all-MiniLM-L6-v2").max_model_len == 256  # retrievable by name, as listed
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
    assert got.shape == (5, 384) and r.model == "all-MiniLM-L6-v2"
    np.testing.assert_allclose(got, reference(TEXTS), atol=2e-5)
    alone = np.array(client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[2]).data[0].embedding)
    np.testing.assert_allclose(alone, got[2], atol=2e-5)
    assert got[0] @ got[1] > got[0] @ got[2] + 0.3  # the two cat sentences are closer than the revenue one
    assert (
        r.usage.prompt_tokens == r.usage.total_tokens == sum(len(Embedder().tokenizer(t)["input_ids"]) for t in TEXTS)
    )


def test_base64_and_token_ids(server):
    h = http(server)
    floats = h.post("/v1/embeddings", json={"input": TEXTS[:2]}).json()["data"]
    packed = h.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}).json()["data"]
    for f, p in zip(floats, packed):
        np.testing.assert_array_equal(
            np.frombuffer(base64.b64decode(p["embedding"]), dtype="<f4"), np.float32(f["embedding"])
        )
    ids = Embedder().tokenizer(TEXTS[0])["input_ids"]
    by_ids = h.post("/v1/embeddings", json={"input": [ids]}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(by_ids, floats[0]["embedding"], atol=1e-6)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": ""}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input"),
        ({"input": "word " * 400}, 400, "input"),  # over the model's 256 tokens
        ({"input": [[10**9]]}, 400, "input"),
        ({"input": "x", "dimensions": 64}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
    ],
)
def test_embedding_errors_name_the_field(server, body, status, param):
    r = http(server).post("/v1/embeddings", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_a_server_without_an_embedder_says_so(tiny_model):
    live = serve(tiny_model, max_model_len=256, kv_cache_bytes=4 << 20)
    try:
        with pytest.raises(openai.NotFoundError, match="serves no embedding model"):
            live.client().embeddings.create(model="all-MiniLM-L6-v2", input="x")
    finally:
        live.close()
