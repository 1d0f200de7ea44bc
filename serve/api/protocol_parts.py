"""The nested objects of OpenAI's structured-output and tool-calling fields (the requests that
hold them are in serve.api.protocol)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.api.errors import ApiError


class Strict(BaseModel):
    """A request body part that refuses any field it does not declare, and values of another
    JSON type than the field's (strict: `true` and `"4"` are not integers, as /openapi.json says),
    and text no tokenizer can take: a lone UTF-16 surrogate ("\\ud800" is valid JSON, not Unicode)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        if (path := lone_surrogate(data)) is not None:
            name = ".".join(map(str, path)) or None
            raise ApiError(
                400,
                f"{name or 'body'}: text must be valid Unicode; a lone UTF-16 surrogate (such as \\ud800) is not",
                param=name,
            )
        return data


def lone_surrogate(value: Any, path: tuple = ()) -> tuple | None:
    """Where in a parsed JSON value a string holds a lone surrogate (a path of keys and indices),
    or None. Strings are checked by encoding them, which such a character cannot survive."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and lone_surrogate(key) is not None:
            return (*path, key)
        if (found := lone_surrogate(item, (*path, key))) is not None:
            return found
    return None


class JsonSchemaFormat(Strict):
    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # enforced either way: the grammar engine is exact


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` (extra body): exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class FunctionDef(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # forced calls are exact either way


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
