"""The HTTP API fuzzed against its own /openapi.json (serve.api.openapi) with schemathesis.

The app runs in process (schemathesis's ASGI transport; the engine's step loop on its own
thread) over the tiny random Llama the other serve tests use, so every request is cheap. Each
operation gets a bounded number of generated requests, valid ones and ones that break the
schema, with a fixed seed (`derandomize`), and every answer must be: no 5xx, within a timeout
(no hang), a status the schema documents, with the documented content type, headers and body.
Streamed answers are checked event by event.

Valid requests are first repaired for the cross-field rules the schema cannot state
(bench/fuzz_api.py's `repaired`), or nearly all of them would stop at those and never reach the
engine. Breaking requests must get a documented answer, and a refusal (schemathesis's
negative_data_rejection: a 4xx).

Each failure fuzzing found is pinned below as a regression test with a minimal body.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.testclient import TestClient

from serve.api import build_app
from serve.api.openapi import ROUTES
from serve.async_engine import AsyncEngine
from serve.config import EngineConfig
from serve.engine.llm_engine import LLMEngine
from test_serve_api import smollm2, tiny_model  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fuzz_api import CHECKS, CONFIG, negative_data_rejection, repaired  # noqa: E402

EXAMPLES = 25  # generated requests per operation and mode: 9 operations x 2 modes x 25 in ~20-40 s on 2 cores
TIMEOUT_S = 30.0  # an answer slower than this is a hang: the slowest legal one here takes well under a second


def build(model, api_key: str | None = None) -> tuple[FastAPI, AsyncEngine]:
    """The server as `ministack serve` builds it, with its schema installed; a short context
    keeps the longest legal generation short."""
    engine = LLMEngine(
        EngineConfig(model=str(model), dtype="float32", max_model_len=128, max_num_seqs=8, kv_cache_bytes=8 << 20)
    )
    backend = AsyncEngine(engine, max_queue=64)
    return build_app(backend, api_key=api_key), backend


@pytest.fixture(scope="module")
def app(tiny_model) -> Iterator[FastAPI]:  # noqa: F811
    app, backend = build(tiny_model)
    yield app
    backend.close()


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def test_every_route_is_documented_and_none_documents_422(app):
    served = {
        (method.lower(), re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path))  # {model:path} is documented as {model}
        for route in app.routes
        if getattr(route, "include_in_schema", False)
        for method in route.methods
    }
    assert served == set(ROUTES), "document each route in serve.api.openapi.ROUTES"
    doc = app.openapi()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], f"{method} {path}"
            assert {"200", "400", "500"} <= set(operation["responses"]), f"{method} {path}"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert not list(OPENAPI_31_VALIDATOR.iter_errors(doc)), "not a valid OpenAPI 3.1 document"
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) == {"200", "400", "404", "413", "429", "500", "503"}  # no 401 without an API key
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["429"]["headers"]["Retry-After"]["required"] is True


def test_a_server_with_an_api_key_documents_401_and_answers_it_as_documented(tiny_model):  # noqa: F811
    app, backend = build(tiny_model, api_key="secret")
    try:
        schema = schemathesis.openapi.from_asgi(
            "/openapi.json", app, config=CONFIG, headers={"Authorization": "Bearer secret"}
        )
        doc = app.openapi()
        assert "401" in doc["paths"]["/v1/models"]["get"]["responses"]
        assert "401" in doc["paths"]["/metrics"]["get"]["responses"]  # behind the key unless --public-metrics
        assert "401" not in doc["paths"]["/health"]["get"]["responses"]  # health checks need no key
        operation = schema["/v1/completions"]["POST"]
        case = operation.Case(body={"prompt": "Hi", "max_tokens": 2})
        response = case.call(timeout=TIMEOUT_S)
        assert response.status_code == 401
        case.validate_response(response, checks=CHECKS)
    finally:
        backend.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("method, path", sorted((m.upper(), p) for m, p in ROUTES), ids=lambda v: v)
def test_fuzzed_requests_get_documented_answers(schema, method, path, mode):
    """Valid requests (positive) and ones that break the schema (negative) each get a
    documented answer, in time, never a 5xx."""
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy.map(repaired) if mode is GenerationMode.POSITIVE else strategy)
    def fuzz(case) -> None:
        case.call_and_validate(
            checks=CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else []), timeout=TIMEOUT_S
        )

    fuzz()


# ---- failures fuzzing found ------------------------------------------------------------------


def post(client: TestClient, path: str, body: dict):
    """`body` as JSON text exactly as a client sends it (a lone surrogate escaped as \\ud800)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_whose_constraints_leave_no_token_is_a_400(client, app, stream):
    eos = app.state.backend.tokenizer.eos_token_id  # held back by min_tokens, and the only token allowed
    body = {"prompt": "Hi", "allowed_token_ids": [eos], "min_tokens": 1, "max_tokens": 2, "stream": stream}
    r = post(client, "/v1/completions", body)
    if stream:  # the error comes once the headers are out: as an event, which must not be a server_error
        error = next(json.loads(line[6:]) for line in r.text.splitlines() if line.startswith('data: {"error"'))["error"]
        assert error["type"] == "invalid_request_error", error
    else:
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}),
        ("/tokenize", {"prompt": "\ud800"}),
    ],
    ids=["completions", "chat", "tokenize"],
)
def test_a_lone_surrogate_in_a_prompt_is_a_400(client, path, body):
    r = post(client, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] is not None, r.text


@pytest.mark.parametrize(
    "path, body",
    [
        ("/detokenize", {"tokens": [True]}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": "4"}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": True}),
    ],
    ids=["bool-token", "string-max_tokens", "bool-max_tokens"],
)
def test_integers_are_not_coerced_from_booleans_or_strings(client, path, body):
    r = post(client, path, body)
    assert r.status_code == 400, r.text
