"""OpenAI's error body, the request field a failure is about (its `param`), and the app's
exception handlers that answer every failure with that body."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine.sampling_params import ParamError


class ApiError(Exception):
    """An error answered as OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def refused(exc: ValueError) -> ApiError:
    """A 400 for what the engine refused: naming the setting a ParamError carries, else no field."""
    return ApiError(400, str(exc), param=exc.param if isinstance(exc, ParamError) else None)


def field_name(loc: tuple[Any, ...]) -> str | None:
    """The request field a pydantic error location points at: ('body', 'messages', 0, 'role')
    -> 'messages.0.role'. pydantic also names the union member it tried ('str', 'list[int]');
    those are types, not fields, and are left out."""
    names = [str(p) for p in (loc[1:] if loc and loc[0] == "body" else loc)]
    return ".".join(n for n in names if not ("[" in n or n in _TYPE_NAMES)) or None


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict"})


def invalid_body(exc: RequestValidationError) -> ApiError:
    """pydantic's refusal of a request body as one 400 naming the field. A union field (content:
    str | list of parts) fails once per member: the deepest error is the one that explains."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    if err["type"] == "json_invalid":
        return ApiError(400, f"invalid JSON in the request body: {err.get('ctx', {}).get('error', err['msg'])}")
    param = field_name(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":  # fail closed: never a 200 that ignored what was asked
        return ApiError(
            400,
            f"{param}: not supported by this server (docs/serving.md lists every accepted field)",
            param=param,
            code="unsupported_parameter",
        )
    return ApiError(400, f"{param or 'body'}: {err['msg']}", param=param)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(invalid_body(exc).body(), status_code=400)


async def _crash(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(ApiError(500, f"internal error: {exc!r}", type="server_error").body(), status_code=500)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = ApiError(
        exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500 else "server_error"
    )
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answered with OpenAI's body: ours, pydantic's, Starlette's (404, 405) and
    the unforeseen (500)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _crash)
    app.add_exception_handler(StarletteHTTPException, _http_error)
