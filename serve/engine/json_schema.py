"""JSON schemas made exact before xgrammar compiles them (serve.engine.structured).

xgrammar reads a schema more loosely than JSON Schema in three ways this module closes:

- Keywords: one it would silently ignore (`uniqueItems`, `not`, `if`/`then`, `contains`,
  `dependentRequired`, ..., found by sampling random token walks under each keyword and
  validating them) is refused by name (`check_schema`).
- Implicit structure (`explicit`): a subschema with no `type` gets any JSON value, its
  `pattern`, `minLength` or `minimum` unenforced, so the type is inferred from the keywords as
  JSON Schema applies them (string keywords constrain strings, numeric ones numbers, and so
  on); and a `required` key that `properties` does not list is left out of the grammar (so
  `{"type": "object", "required": ["b"]}` gave `{}`), so it is listed, under the subschema
  JSON Schema gives it (the first matching `patternProperties`, else `additionalProperties`).
- Contradictions (`check_satisfiable`): a schema no value can match (bounds the wrong way
  round, an empty enum, a required key whose subschema is `false`) is refused naming where,
  before anything is queued, rather than surfacing as the grammar engine's own error or a
  grammar that can never finish.

Each step walks every subschema: properties, patternProperties, $defs, definitions, items,
additionalProperties, propertyNames, anyOf, allOf, prefixItems.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

# keywords whose constraint xgrammar enforces (each checked by sampling, tests/test_serve_structured.py)
ENFORCED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "patternProperties",
    "propertyNames",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "anyOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
}
ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
}
FORMATS = {
    "email",
    "date",
    "time",
    "date-time",
    "duration",
    "ipv4",
    "ipv6",
    "hostname",
    "uuid",
    "uri",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
}
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
SUBSCHEMAS = ("items", "additionalProperties", "propertyNames")
SUBSCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")

# the keywords that constrain one JSON type each: what a subschema without `type` is inferred from
TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties", "patternProperties", "propertyNames"},
}
DEFINES_VALUES = {"type", "enum", "const", "$ref", "anyOf", "allOf"}  # a subschema with any of these is not inferred


def subschemas(node: dict, path: str) -> Iterator[tuple[Any, str]]:
    """(subschema, its path) of every place `node` holds one, in the schema's order."""
    for key, value in node.items():
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            yield from ((sub, f"{path}.{key}.{name}") for name, sub in value.items())
        elif key in SUBSCHEMAS:
            yield value, f"{path}.{key}"
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            yield from ((sub, f"{path}.{key}.{i}") for i, sub in enumerate(value))


def check_schema(schema: Any, path: str = "schema") -> None:
    """ValueError naming the first keyword (and where) this engine would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{path} must be a JSON schema object, got {type(schema).__name__}")
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key not in ENFORCED | ANNOTATIONS:
            raise ValueError(
                f"{where}: the JSON-schema keyword {key!r} is not enforced by this server's grammar engine"
            )
        if key == "format" and value not in FORMATS:
            raise ValueError(f"{where}: format {value!r} is not enforced (supported: {', '.join(sorted(FORMATS))})")
        if key == "allOf" and len(value) != 1:
            raise ValueError(f"{where}: allOf is enforced with one subschema only (merge them)")
        if (key in SUBSCHEMA_MAPS and not isinstance(value, dict)) or (
            key in SUBSCHEMA_LISTS and not isinstance(value, list)
        ):
            raise ValueError(f"{where} must be a JSON {'object' if key in SUBSCHEMA_MAPS else 'array'}")
    for sub, where in subschemas(schema, path):
        check_schema(sub, where)


def explicit(schema: Any, path: str = "schema") -> Any:
    """`schema` with what xgrammar would read loosely written out (module docstring): types
    inferred where no `type` is given, and required keys listed in `properties`. A new schema;
    key order (the output's order) kept, required keys that were not listed last."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: explicit(sub, f"{path}.{key}.{name}") for name, sub in value.items()}
        elif key in SUBSCHEMAS:
            out[key] = explicit(value, f"{path}.{key}")
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [explicit(sub, f"{path}.{key}.{i}") for i, sub in enumerate(value)]
    if not DEFINES_VALUES & out.keys():
        types = [t for t, keywords in TYPE_KEYWORDS.items() if keywords & out.keys()]
        if types:
            out["type"] = types[0] if len(types) == 1 else types
    required = out.get("required")
    if isinstance(required, list) and any(key not in (out.get("properties") or {}) for key in required):
        properties = dict(out.get("properties") or {})
        for key in required:
            if isinstance(key, str) and key not in properties:
                properties[key] = governing(out, key, path)
        out["properties"] = properties
    return out


def governing(node: dict, key: str, path: str) -> Any:
    """The subschema JSON Schema applies to property `key` of `node` (at `path`) when
    `properties` does not list it: the matching `patternProperties` one, else
    `additionalProperties` (any value when absent). ValueError where several patterns match
    (JSON Schema would apply all of them)."""
    matching = [sub for pattern, sub in (node.get("patternProperties") or {}).items() if re.search(pattern, key)]
    if len(matching) > 1:
        raise ValueError(f"{path}.required: the key {key!r} matches several patternProperties: list it in properties")
    if matching:
        return matching[0]
    extra = node.get("additionalProperties", True)
    return {} if extra is True else extra


def check_satisfiable(schema: Any, path: str = "schema") -> None:
    """ValueError naming the first subschema (and why) that no value can match: a root or
    required property of `false`, an empty enum, lower bounds above upper ones (numbers, and
    for integers no integer between), string lengths or array sizes the wrong way round.
    Run on `explicit`'s output, so a required key that `additionalProperties: false` forbids
    is a required `false` too."""
    if schema is False:
        raise ValueError(f"{path} is false: no value can satisfy it")
    if not isinstance(schema, dict):
        return
    if schema.get("enum") == []:
        raise ValueError(f"{path}.enum is empty: no value can satisfy it")
    for low, high, what in (("minLength", "maxLength", "string length"), ("minItems", "maxItems", "array size")):
        if (
            isinstance(schema.get(low), (int, float))
            and isinstance(schema.get(high), (int, float))
            and schema[low] > schema[high]
        ):
            raise ValueError(f"{path}: {low} {schema[low]} exceeds {high} {schema[high]}: no {what} can satisfy it")
    check_range(schema, path)
    properties = schema.get("properties") or {}
    for key in schema.get("required") or []:
        if properties.get(key) is False:
            raise ValueError(
                f"{path}.required: the key {key!r} is required, but its subschema is false "
                "(or additionalProperties forbids it): no object can satisfy it"
            )
    for sub, where in subschemas(schema, path):
        if sub is not False:  # false elsewhere only forbids (a property, further items)
            check_satisfiable(sub, where)


def check_range(schema: dict, path: str) -> None:
    """ValueError when the numeric bounds of `schema` leave no number (for type integer: no
    integer) between them."""
    bound = {
        k: schema[k]
        for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
        if isinstance(schema.get(k), (int, float)) and not isinstance(schema.get(k), bool)
    }
    lows = [(v, k == "exclusiveMinimum") for k, v in bound.items() if k.endswith("inimum")]
    highs = [(v, k == "exclusiveMaximum") for k, v in bound.items() if k.endswith("aximum")]
    if not lows or not highs:
        return
    (low, low_open), (high, high_open) = max(lows), min(highs, key=lambda b: (b[0], not b[1]))
    empty = low > high or (low == high and (low_open or high_open))
    if schema.get("type") == "integer":
        first = math.floor(low) + 1 if low_open else math.ceil(low)
        last = math.ceil(high) - 1 if high_open else math.floor(high)
        empty = first > last
    if empty:
        shown = ", ".join(f"{k} {v}" for k, v in bound.items())
        raise ValueError(
            f"{path}: {shown}: no {'integer' if schema.get('type') == 'integer' else 'number'} can satisfy it"
        )


def enforceable(schema: Any, path: str = "schema") -> Any:
    """The schema the grammar is compiled from (module docstring): its keywords checked, its
    implicit structure written out, then refused if no value can match it."""
    check_schema(schema, path)
    out = explicit(schema, path)
    check_satisfiable(out, path)
    return out
