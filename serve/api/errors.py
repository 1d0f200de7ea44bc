"""OpenAI's error body, and the request field a failure is about (its `param`)."""

from __future__ import annotations

from typing import Any

from serve.engine.sampling_params import ParamError


class ApiError(Exception):
    """An error answered as OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
        code: str | None = None, headers: dict[str, str] | None = None,
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
