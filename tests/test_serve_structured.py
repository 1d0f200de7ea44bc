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

from serve.engine.structured import StructuredOutput, check_schema

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
    "$defs": {"pet": {"type": "object", "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                      "required": ["legs"], "additionalProperties": False}},
}


@pytest.mark.parametrize("keyword, schema", [
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("not", {"not": {"type": "integer"}}),
    ("if", {"if": {"type": "integer"}, "then": {"minimum": 3}}),
    ("contains", {"type": "array", "contains": {"const": 7}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "number"}]}),  # enforced as anyOf: 5 would match both
    ("minProperties", {"type": "object", "minProperties": 1}),
    ("format", {"type": "string", "format": "credit-card"}),
    ("allOf", {"allOf": [{"type": "integer"}, {"minimum": 3}]}),
])
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
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}},
                    lambda text: jsonschema.validate(json.loads(text), PERSON)),
    "structured_outputs.regex": ({"extra_body": {"structured_outputs": {"regex": r"[a-c]{3}-[0-9]{2}"}}},
                                 lambda text: re.fullmatch(r"[a-c]{3}-[0-9]{2}", text) or pytest.fail(text)),
    "guided_choice": ({"extra_body": {"guided_choice": ["yes", "no", "it depends"]}},
                      lambda text: text in ("yes", "no", "it depends") or pytest.fail(text)),
    "structured_outputs.grammar": ({"extra_body": {"structured_outputs": {"grammar": 'root ::= "(" digit+ ")"\ndigit ::= [0-9]'}}},
                                   lambda text: re.fullmatch(r"\(\d+\)", text) or pytest.fail(text)),
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
    r = chat(client, model_name, n=3, seed=7, temperature=1.0, max_tokens=160,
             response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in r.choices}) > 1


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema", "schema is required"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "one structured output at a time"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_json": "{not json"}, "guided_json", "guided_json"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "refused"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "structured output"),
])
def test_bad_structured_requests_are_400s(server, extra, param, message):
    r = http(server).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4} | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_json_object_on_the_real_model(smollm2):
    from test_serve_api import serve

    live = serve(smollm2, api_key=None, max_model_len=512, kv_cache_bytes=64 << 20)
    try:
        messages = [{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}]
        for stream in (False, True):
            texts = structured_texts(live.client(api_key="x"), live.backend.model_name, stream, range(3), messages=messages,
                                     max_tokens=120, response_format={"type": "json_object"})
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
        r = client.beta.chat.completions.parse(model=model_name, messages=CHAT, response_format=Person, seed=seed,
                                               temperature=1.0, max_tokens=120)
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 120 and len(person.name) <= 8
