"""Structured outputs (serve/engine/structured.py, xgrammar): every output a constraint
finishes parses and validates, over many seeded requests, streamed and not, through the
official `openai` client; JSON-schema keywords the engine would not enforce are refused by name."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from test_serve_api import client, http, model_name, server, smollm2, tiny_model  # noqa: F401 (fixtures)
from test_serve_api_fields import CHAT, chat

from serve.engine.json_schema import check_schema, explicit
from serve.config import DEFAULT_JSON_MAX_DIGITS
from serve.engine.structured import Grammars, StructuredOutput

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
    },
    "required": ["name", "age", "colour", "tags", "pet"],
    "additionalProperties": False,
    "$defs": {
        "pet": {
            "type": "object",
            "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8}},
            "required": ["legs"],
            "additionalProperties": False,
        }
    },
}


@pytest.mark.parametrize(
    "keyword, schema",
    [
        ("uniqueItems", {"type": "array", "uniqueItems": True}),
        ("not", {"not": {"type": "integer"}}),
        ("if", {"if": {"type": "integer"}, "then": {"minimum": 3}}),
        ("contains", {"type": "array", "contains": {"const": 7}}),
        ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
        ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}),  # enforced as anyOf: 5 would match both
        ("minProperties", {"type": "object", "minProperties": 1}),
        ("format", {"type": "string", "format": "credit-card"}),
        ("allOf", {"allOf": [{"type": "integer"}, {"minimum": 3}]}),
    ],
)
def test_keywords_the_engine_would_ignore_are_refused_by_name(keyword, schema):
    nested = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(ValueError, match=rf"schema\.properties\.x\.{keyword}"):
        check_schema(nested)


def test_the_keywords_it_enforces_pass():
    check_schema(PERSON)
    assert StructuredOutput.json_schema(None).spec == '{"type": "object"}'


def structured_texts(client, model_name, stream: bool, seeds: range, **kw) -> list[tuple[str, str]]:
    """(text, finish_reason) of each seeded request."""
    out = []
    for seed in seeds:
        if stream:
            text, finish = "", None
            for chunk in chat(client, model_name, stream=True, seed=seed, temperature=1.0, **kw):
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            out.append((text, finish))
        else:
            r = chat(client, model_name, seed=seed, temperature=1.0, **kw)
            out.append((r.choices[0].message.content, r.choices[0].finish_reason))
    return out


FORMATS = {
    "json_schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            }
        },
        lambda text: jsonschema.validate(json.loads(text), PERSON),
    ),
    "structured_outputs.regex": (
        {"extra_body": {"structured_outputs": {"regex": r"[a-c]{3}-[0-9]{2}"}}},
        lambda text: re.fullmatch(r"[a-c]{3}-[0-9]{2}", text) or pytest.fail(text),
    ),
    "guided_choice": (
        {"extra_body": {"guided_choice": ["yes", "no", "it depends"]}},
        lambda text: text in ("yes", "no", "it depends") or pytest.fail(text),
    ),
    "structured_outputs.grammar": (
        {"extra_body": {"structured_outputs": {"grammar": 'root ::= "(" digit+ ")"\ndigit ::= [0-9]'}}},
        lambda text: re.fullmatch(r"\(\d+\)", text) or pytest.fail(text),
    ),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_output_matches_its_constraint_streamed_and_not(client, model_name, name):
    """The tiny random model's text is noise: only the grammar makes it valid."""
    kw, check = FORMATS[name]
    whole = structured_texts(client, model_name, False, range(12), max_tokens=160, **kw)
    for text, finish in whole:
        assert finish == "stop", (text, finish)
        check(text)
    assert structured_texts(client, model_name, True, range(12), max_tokens=160, **kw) == whole


def test_n_sequences_each_follow_the_grammar(client, model_name):
    r = chat(
        client,
        model_name,
        n=3,
        seed=7,
        temperature=1.0,
        max_tokens=160,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in r.choices}) > 1


@pytest.mark.parametrize(
    "extra, param, message",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format",
            "uniqueItems",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "schema is required",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
            "guided_regex",
            "one structured output at a time",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_json": "{not json"}, "guided_json", "guided_json"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "refused"),
        ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "structured output"),
    ],
)
def test_bad_structured_requests_are_400s(server, extra, param, message):
    r = http(server).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4} | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


UNTYPED = {  # subschemas without `type`: each keyword applies to the type it constrains, as JSON Schema reads it
    "type": "object",
    "properties": {
        "code": {"pattern": "^[a-c]{3}$"},
        "n": {"minimum": 1, "maximum": 9},
        "word": {"minLength": 2, "maxLength": 4},
    },
    "required": ["code", "n", "word"],
}
REQUIRED_ONLY = {  # required keys properties does not list: each under the subschema that governs it (a pattern's here)
    "type": "object",
    "properties": {"a": {"type": "boolean"}},
    "required": ["a", "b"],
    "patternProperties": {"^b$": {"type": "integer", "minimum": 0, "maximum": 99}},
}


def test_a_required_key_properties_does_not_list_is_listed_under_its_governing_subschema():
    small = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {
        "type": "object",
        "properties": {"a": {}},
        "required": ["a", "x_1", "b"],
        "patternProperties": {"^x_": {"enum": ["p"]}},
        "additionalProperties": small,
    }
    assert explicit(schema)["properties"] == {
        "a": {},
        "x_1": {"enum": ["p"]},
        "b": small,
    }  # listed last, in required's order
    assert explicit({"type": "object", "required": ["b"]})["properties"] == {
        "b": {}
    }  # no additionalProperties: any value
    assert explicit({"required": ["b"], "additionalProperties": False})["properties"] == {
        "b": False
    }  # refused as unsatisfiable
    assert explicit({"items": {"maxLength": 2}})["items"] == {
        "maxLength": 2,
        "type": "string",
    }  # inferred at every depth
    assert explicit({"minimum": 0, "maxLength": 3})["type"] == ["string", "number"]  # keywords of two types: either
    assert "type" not in explicit(
        {"enum": [1, "a"], "maxLength": 3}
    )  # enum, const, $ref, anyOf define the values themselves


def test_a_required_key_alone_is_written(client, model_name):
    """`{"type": "object", "required": ["b"]}` gave `{}`: b is now in the grammar, with any value
    (greedy: sampled, the random model's value of any type can run on as a string to max_tokens)."""
    kw = dict(
        temperature=0,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "required": ["b"]}},
        },
    )
    whole = chat(client, model_name, **kw).choices[0]
    assert whole.finish_reason == "stop" and list(json.loads(whole.message.content)) == ["b"], whole
    assert (
        "".join(c.choices[0].delta.content or "" for c in chat(client, model_name, stream=True, **kw) if c.choices)
        == whole.message.content
    )


@pytest.mark.parametrize("schema", [UNTYPED, REQUIRED_ONLY], ids=["untyped", "required"])
def test_what_a_schema_leaves_implicit_is_enforced_streamed_and_not(client, model_name, schema):
    """Types inferred from the keywords (a pattern makes a string, a minimum a number) and every
    required key present, even one `properties` does not list."""
    kw = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    whole = structured_texts(client, model_name, False, range(4), max_tokens=60, **kw)
    for text, finish in whole:
        assert finish == "stop", (text, finish)
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert set(schema["required"]) <= set(value)
        if schema is UNTYPED:
            assert (
                isinstance(value["code"], str)
                and isinstance(value["n"], (int, float))
                and isinstance(value["word"], str)
            )
        if schema is REQUIRED_ONLY:
            assert isinstance(value["b"], int) and 0 <= value["b"] <= 99
    assert structured_texts(client, model_name, True, range(4), max_tokens=60, **kw) == whole


@pytest.mark.parametrize(
    "schema, where",
    [
        ({"type": "object", "properties": {"b": False}, "required": ["b"]}, "schema.required"),
        ({"type": "object", "required": ["b"], "additionalProperties": False}, "schema.required"),
        (
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 3}}},
            "schema.properties.n",
        ),
        (
            {"type": "object", "properties": {"n": {"exclusiveMinimum": 1, "exclusiveMaximum": 1}}},
            "schema.properties.n",
        ),
        ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 4}, "schema"),
        ({"type": "object", "properties": {"s": {"minLength": 5, "maxLength": 3}}}, "schema.properties.s"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "schema"),
        ({"type": "object", "properties": {"c": {"enum": []}}}, "schema.properties.c.enum"),
    ],
)
def test_a_schema_no_value_can_match_is_a_400_before_any_prefill(server, schema, where):
    """Refused by the request's own field, naming where the contradiction is, before the engine
    sees the prompt; the same through guided_json and a forced tool's parameters."""
    before = server.backend.stats().prefix_cache_queries
    for extra, param in (
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
            "response_format",
        ),
        ({"guided_json": schema}, "guided_json"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ):
        r = http(server).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "stream": True} | extra)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        named = where.replace("schema", "tools.f.parameters", 1) if param == "tools" else where
        assert error["param"] == param and named in error["message"] and "can satisfy it" in error["message"], error
    assert server.backend.stats().prefix_cache_queries == before  # nothing was scheduled


UNBOUNDED = {
    "type": "object",
    "properties": {  # numbers a schema bounds on no side, or on one; a string of digits
        "i": {"type": "integer"},
        "x": {"type": "number"},
        "low": {"type": "integer", "minimum": -5},
        "frac": {"type": "number", "exclusiveMinimum": 0},
        "code": {"type": "string", "pattern": "^[0-9]*$"},
    },
    "required": ["i", "x", "low", "frac", "code"],
}


@pytest.mark.parametrize("digits", [DEFAULT_JSON_MAX_DIGITS, 4])
def test_numbers_a_schema_leaves_unbounded_get_at_most_the_engines_digits(server, digits):
    """--json-max-digits: that many digits before a number's point and after it, 3 in an exponent,
    one-sided bounds included; a string's pattern is not a number and keeps its own rule."""
    engine = server.backend.engine
    grammars = (
        engine.grammars()
        if digits == engine.config.json_max_digits
        else Grammars(engine.tokenizer, engine.model.lm_head.out_features, engine.token_bytes, digits)
    )
    so, n = StructuredOutput.json_schema(UNBOUNDED), "9" * digits

    def accepted(i="1", x="1.5", low="1", frac="0.5", code="1") -> bool:
        return grammars.matcher(so).accept_string(
            f'{{"i": {i}, "x": {x}, "low": {low}, "frac": {frac}, "code": "{code}"}}'
        )

    assert accepted(i=f"-{n}", x=f"-{n}.{n}e-999", low=n, frac=f"{n}.5", code="1" * 40)
    for field in (
        dict(i=n + "9"),
        dict(x=n + "9"),
        dict(x=f"1.{n}9"),
        dict(x="1e1000"),
        dict(low=n + "9"),
        dict(frac=n + "9.5"),
    ):
        assert not accepted(**field), field


def test_greedy_decoding_ends_an_unbounded_number(client, model_name):
    """The tiny model's greedy choice under an integer or number is a digit again and again: it
    wrote `-1111...` to max_tokens; now the number ends at 15 digits and the JSON with it."""
    for schema in ({"type": "integer"}, {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}):
        kw = dict(
            temperature=0,
            max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        whole = chat(client, model_name, **kw).choices[0]
        assert whole.finish_reason == "stop", whole
        jsonschema.validate(json.loads(whole.message.content), schema)
        assert max(len(run) for run in re.findall(r"[0-9]+", whole.message.content)) <= DEFAULT_JSON_MAX_DIGITS
        assert (
            "".join(c.choices[0].delta.content or "" for c in chat(client, model_name, stream=True, **kw) if c.choices)
            == whole.message.content
        )


def test_json_object_on_the_real_model(smollm2):
    from test_serve_api import serve

    live = serve(smollm2, api_key=None, max_model_len=512, kv_cache_bytes=64 << 20)
    try:
        messages = [{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}]
        for stream in (False, True):
            texts = structured_texts(
                live.client(api_key="x"),
                live.backend.model_name,
                stream,
                range(3),
                messages=messages,
                max_tokens=120,
                response_format={"type": "json_object"},
            )
            for text, finish in texts:
                assert finish == "stop" and isinstance(json.loads(text), dict), text
    finally:
        live.close()


def test_the_official_clients_parse_helper_gets_its_pydantic_model(client, model_name):
    """`client.beta.chat.completions.parse(response_format=Model)`: the client turns the model
    into a strict JSON schema (titles, $defs, anyOf for Optional) and parses the answer back."""
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        legs: int = Field(ge=0, le=8)

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        pet: Pet | None

    for seed in range(4):
        r = client.beta.chat.completions.parse(
            model=model_name, messages=CHAT, response_format=Person, seed=seed, temperature=1.0, max_tokens=120
        )
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 120 and len(person.name) <= 8
