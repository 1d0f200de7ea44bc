"""/openapi.json as the server really answers: `install_openapi(app, api_key=...)`.

FastAPI documents what it can see from the handlers' signatures, and here that is wrong in
three ways: every route with a body documents a 422 that never happens (the server answers
validation errors with 400 and OpenAI's `{"error": {message, type, param, code}}` body), the
errors the server does raise (400, 401, 404, 413, 429 + Retry-After, 500, 503) are missing, and the
200 bodies are `{}` (the handlers return `Response` or `dict`). Clients generated from the
schema, and schema fuzzers, then expect the wrong things.

Each documented operation's `responses` are therefore written here from one table (`ROUTES`):
the 200 body from the real response models (serve.api.responses; the streaming routes also as
`text/event-stream`, one `data:` event per chunk, an in-band error event, then `[DONE]`), and
every error status the route can produce with the error body; 401 where the route is behind
serve.api.auth's guard and the server has a key. The request side (bodies, their
field constraints) stays FastAPI's, generated from serve.api.protocol. The responses are
replaced whole rather than given to FastAPI as `responses=` metadata because FastAPI would
still add its 422 to every body route and would merge a 200 model into the `-> dict`
annotation's schema. A route missing from `ROUTES` keeps FastAPI's 200 and gets the errors
every route can answer (400, 500); tests/test_serve_fuzz.py fails until it is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve.api.protocol_score import RerankResponse, ScoreResponse
from serve.api.request_id import VALID as REQUEST_ID
from serve.api.responses import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse

REF = "#/components/schemas/{model}"


# ---- bodies the handlers build as dicts (documented here; the handlers are the source) -------


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, rate_limit_error, server_error
    param: str | None  # the request field the error is about (messages.0.role), if any
    code: str | None  # model_not_found, unsupported_parameter, engine_overloaded, queue_timeout, invalid_api_key, ...


class ErrorResponse(BaseModel):
    """OpenAI's error body, for every error status of every route."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (encoding_format "base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- what each route answers -------------------------------------------------------------


ERRORS = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, a field this server does not "
    "support (`code: unsupported_parameter`), a prompt or max_tokens past the context, an X-Request-Id that is "
    "not 1-128 printable ASCII characters or is in use.",
    401: "No `Authorization: Bearer` header with the server's API key (`code: invalid_api_key`).",
    413: "The request body is larger than --max-request-bytes.",
    404: "`model` is not a model this server serves (`code: model_not_found`; GET /v1/models lists them).",
    429: "The engine is overloaded: --max-queue requests or --max-num-queued-tokens prompt tokens already wait "
    "(`code: engine_overloaded`). Retry after Retry-After seconds.",
    500: "Internal error, or the engine failed this request (a stream reports it as an event once its headers "
    "are out).",
    503: "The engine is not serving: it has stopped or is shutting down (`code: engine_unavailable`), or the request "
    "waited past --max-queue-time unscheduled and was dropped (`code: queue_timeout`, with Retry-After). Once a "
    "stream's headers were sent, the same error comes as an event instead.",
}


@dataclass(frozen=True)
class Route:
    """What one route answers: its 200 body (`body`, JSON; or `text`, a media type; or neither:
    no body), `stream`: each event of the SSE answer to `"stream": true`; `errors`: the statuses
    it can fail with besides 400 and 500 (every route: a bad X-Request-Id, an unexpected fault),
    413 (every route with a body) and 401 (found on the app: serve.api.auth's guard)."""

    summary: str
    body: type[BaseModel] | None = None
    text: str | None = None
    stream: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()


ROUTES: dict[tuple[str, str], Route] = {
    ("get", "/health"): Route("200 while the engine serves, 503 (no body) once it has died"),
    ("get", "/metrics"): Route("Prometheus text exposition, vLLM's metric names", text="text/plain"),
    ("get", "/v1/models"): Route("The served models", ModelList),
    ("get", "/v1/models/{model}"): Route(
        "One served model; 404 for a name this server does not serve", ModelCard, errors=(404,)
    ),
    ("post", "/v1/embeddings"): Route("Embeddings of texts or token ids", EmbeddingResponse, errors=(404,)),
    ("post", "/v1/score"): Route(
        "Cosine similarity of text pairs' embeddings (vLLM's; also at /score)", ScoreResponse, errors=(404,)
    ),
    ("post", "/v1/rerank"): Route(
        "Documents ordered by their embeddings' cosine similarity to a query (also at /rerank, /v2/rerank)",
        RerankResponse,
        errors=(404,),
    ),
    ("post", "/tokenize"): Route("A prompt or chat messages as the model's token ids", TokenizeResponse, errors=(404,)),
    ("post", "/detokenize"): Route("Token ids as text", DetokenizeResponse, errors=(404,)),
    ("post", "/v1/completions"): Route(
        "Text completions; `stream: true` answers server-sent events",
        CompletionResponse,
        stream=CompletionResponse,
        errors=(404, 429, 503),
    ),
    ("post", "/v1/chat/completions"): Route(
        "Chat completions; `stream: true` answers server-sent events",
        ChatCompletionResponse,
        stream=ChatCompletionChunk,
        errors=(404, 429, 503),
    ),
}
MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse,
    ModelList,
    ModelCard,
    EmbeddingResponse,
    ScoreResponse,
    RerankResponse,
    TokenizeResponse,
    DetokenizeResponse,
    CompletionResponse,
    ChatCompletionResponse,
    ChatCompletionChunk,
)


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a streamed answer: `data:` holding a chunk, or an error that
    happened after the headers went out, or the closing `[DONE]`. (Before OpenAPI 3.2, a
    text/event-stream schema describes each event, as schemathesis reads it.)"""
    payload = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref(chunk), ref(ErrorResponse)]},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def success(route: Route) -> dict[str, Any]:
    """The 200 response object."""
    content: dict[str, Any] = {}
    if route.body is not None:
        content["application/json"] = {"schema": ref(route.body)}
    if route.text is not None:
        content[route.text] = {"schema": {"type": "string"}}
    if route.stream is not None:
        content["text/event-stream"] = {"schema": sse_event(route.stream)}
    answer: dict[str, Any] = {"description": route.summary, "headers": {"X-Request-Id": request_id_header()}}
    return answer | ({"content": content} if content else {})


def failure(status: int) -> dict[str, Any]:
    """An error response object: OpenAI's body, Retry-After where the server sends one."""
    headers = {"X-Request-Id": request_id_header()}
    if status in (429, 503):  # always with a 429; with a 503 only for a queue timeout
        headers["Retry-After"] = {
            "description": "seconds to wait before retrying",
            "required": status == 429,
            "schema": {"type": "integer", "minimum": 1},
        }
    return {
        "description": ERRORS[status],
        "headers": headers,
        "content": {"application/json": {"schema": ref(ErrorResponse)}},
    }


def request_id_header() -> dict[str, Any]:
    return {
        "description": "the request's id: the client's X-Request-Id, else a fresh one",
        "schema": {"type": "string"},
    }


def responses(route: Route, method: str, guarded: bool) -> dict[str, Any]:
    """Every status `route` can answer with; `guarded`: it answers 401 without the key."""
    statuses = {400, 500, *route.errors, *((401,) if guarded else ()), *((413,) if method == "post" else ())}
    out = {"200": success(route)}
    if route.body is None and route.text is None:  # /health: its 503 has no body either
        statuses.discard(503)
        out["503"] = {"description": "The engine has failed and serves no more requests (no body)."}
    return out | {str(s): failure(s) for s in sorted(statuses)}


def component_schemas() -> dict[str, Any]:
    """JSON schemas of the documented bodies and everything they reference, by model name, as
    the 200 bodies serialize them."""
    _, schema = models_json_schema([(m, "serialization") for m in MODELS], ref_template=REF)
    return schema["$defs"]


def openapi_schema(app: FastAPI, api_key: bool) -> dict[str, Any]:
    """The app's OpenAPI document: FastAPI's request side, the responses from `ROUTES`."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never sent
        schemas.pop(name, None)
    for name, schema in component_schemas().items():
        if name in schemas and schemas[name] != schema:
            raise ValueError(f"two different schemas named {name!r}: rename one of the models")
        schemas[name] = schema
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    parameter = {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "names the request (the response's id, `chatcmpl-<it>`) and comes back in the response",
        "schema": {"type": "string", "pattern": REQUEST_ID.pattern},
    }
    guarded = guarded_routes(app) if api_key else set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            route = ROUTES.get((method, path))
            if route is None:  # undocumented here: FastAPI's 200, and the errors every route can answer
                operation["responses"].pop("422", None)
                operation["responses"] |= {str(s): failure(s) for s in (400, 500)}
                continue
            operation["summary"] = route.summary
            operation["responses"] = responses(route, method, (method, path) in guarded)
            operation["parameters"] = [*operation.get("parameters", []), parameter]
            if (method, path) in guarded:
                operation["security"] = [{"bearer": []}]
    return doc


def guarded_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of the routes behind serve.api.auth's guard: they answer 401 without the key."""
    return {
        (method.lower(), route.path)
        for route in app.routes
        for method in getattr(route, "methods", ())
        if any(dep.dependency.__module__ == "serve.api.auth" for dep in getattr(route, "dependencies", ()))
    }


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Serve `openapi_schema` at /openapi.json (built once, on first request). `api_key`: the
    server requires one (its guarded routes then document 401 and a bearer scheme)."""

    def cached() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app, api_key)
        return app.openapi_schema

    app.openapi = cached
