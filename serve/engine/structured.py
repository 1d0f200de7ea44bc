"""Structured outputs: a JSON schema, a regex, a choice of strings or an EBNF grammar, enforced
by token masks from xgrammar (Dong et al. 2024; the grammar engine vLLM and SGLang use), so
every output a constraint finishes parses and validates.

Each distinct constraint is compiled once (xgrammar's compiler caches by its text); each
sequence gets its own matcher, which fills its row of a batch bitmask before sampling and
accepts the sampled token after. JSON is compact (no free whitespace: a small model otherwise
loops on newlines), and tokens holding a raw control byte are masked under JSON constraints
(xgrammar's string rule admits them, JSON does not).

Compilation time grows faster than linearly with some constraints (xgrammar on two cores: a
10,000-value enum 9 s, a `pattern` of `a{1,10000}` 36 s), so every constraint is held to size
limits before it is compiled (`check_limits`): its text, its nesting, the values of its enums
and choices, and the bounds of its regex repetitions; each refusal names the limit.

JSON schemas are made exact first (serve.engine.json_schema): a keyword xgrammar would
silently ignore is refused by name, types left implicit and required keys left unlisted are
written out, and a schema no value can match is refused naming where.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from serve.config import DEFAULT_JSON_MAX_DIGITS
from serve.engine.json_schema import enforceable

KINDS = ("json", "regex", "choice", "grammar", "tool_calls")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MAX_SPEC_CHARS = 32_768  # the constraint's text: a schema's JSON, a regex, a grammar
MAX_DEPTH = (
    32  # a schema's JSON nesting (objects and arrays: an object property is two levels, its "properties" and itself)
)
MAX_VALUES = 1_024  # enum, const and choice values in one constraint, together
MAX_REPEAT = 256  # a regex's {m,n} bounds (in a regex, a grammar, a schema's pattern)
REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_limits(kind: str, spec: str, schema: Any = None) -> None:
    """ValueError naming the first size limit the constraint exceeds (module docstring)."""
    if len(spec) > MAX_SPEC_CHARS:
        raise ValueError(f"the {kind} constraint is {len(spec):,} characters; at most {MAX_SPEC_CHARS:,} are compiled")
    patterns = [spec] if kind in ("regex", "grammar") else []
    values, stack = 0, [(schema, 1)] if schema is not None else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(
                f"the schema nests JSON objects and arrays more than {MAX_DEPTH} deep "
                '(each nested property counts two: its "properties" object and its own)'
            )
        if isinstance(node, dict):
            values += len(node.get("enum", ())) if isinstance(node.get("enum"), list) else 0
            values += "const" in node
            if isinstance(node.get("pattern"), str):
                patterns.append(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                patterns += list(node["patternProperties"])
            stack += [(v, depth + 1) for v in node.values() if isinstance(v, (dict, list))]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node if isinstance(v, (dict, list))]
    if kind == "choice":
        values = len(json.loads(spec))
    if values > MAX_VALUES:
        raise ValueError(
            f"the {kind} constraint has {values:,} enum/const/choice values; at most {MAX_VALUES:,} are compiled"
        )
    for text in patterns:
        for low, high in REPEAT.findall(text):
            if max(int(low), int(high or 0)) > MAX_REPEAT:
                raise ValueError(
                    f"the repetition {{{low}{',' + high if high else ''}}} exceeds {MAX_REPEAT} "
                    "(bounded repetitions are compiled one copy per count)"
                )


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. `spec`: the JSON schema's text (json; "" for any JSON
    object), the regex, the JSON list of choices, or the EBNF grammar."""

    kind: str
    spec: str

    @classmethod
    def json_schema(cls, schema: dict | None) -> StructuredOutput:
        """Any JSON object (None), or JSON valid under `schema` (held to `check_limits`, then
        made exact by serve.engine.json_schema.enforceable; ValueError naming what is refused)."""
        check_limits("json", json.dumps(schema), schema)
        return cls(
            "json", json.dumps(enforceable(schema) if schema is not None else {"type": "object"})
        )  # key order: output order

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        spec = json.dumps(choices)
        check_limits("choice", spec)
        return cls("choice", spec)


EXPONENT_DIGITS = 3  # float64's exponents run to 308
JSON_EBNF_CACHE = 256  # schemas whose converted grammar is kept
EBNF_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[^"\[]+'
)  # a string literal, a character class, the rest
DIGIT_RULE = re.compile(r"^(\w+) ::= \(\(\[0-9\]\)\)$", re.M)  # a rule that is one digit, as xgrammar writes it


def capped_digits(ebnf: str, digits: int) -> str:
    """xgrammar's JSON grammar `ebnf` with every unbounded run of digits bounded: `digits`
    digits at most before a number's point (and after it), EXPONENT_DIGITS in its exponent.
    Where a schema sets no bound (or one), the grammar lets a number run on, and greedy
    decoding of a model that likes a digit writes `1111...` to max_tokens (llama.cpp caps
    integer digits for the same reason). Runs are `[0-9]*`, `[0-9]+` or `D{m, -1}` with D a
    one-digit rule; one after a leading `[1-9] ` gets one digit fewer. String literals (a
    `pattern`'s Regex("...") among them) are left alone, and so is an integer under
    `multipleOf`: a remainder automaton, not a run."""
    literals: list[str] = []

    def hide(m: re.Match) -> str:
        if not m.group().startswith('"'):
            return m.group()
        literals.append(m.group())
        return f"\x00{len(literals) - 1}\x00"

    masked = EBNF_TOKEN.sub(hide, ebnf)
    names = [rf"(?<!\w){re.escape(name)}" for name in DIGIT_RULE.findall(masked)]
    run = re.compile(
        rf"(?P<lead>\[1-9\] )?(?P<atom>\[0-9\]|{'|'.join(names) or '(?!)'})"
        rf"(?:(?P<star>\*)|(?P<plus>\+)|\{{(?P<low>\d+), -1\}})"
    )

    def bounded(line: str) -> str:
        cap = EXPONENT_DIGITS if "[eE]" in line else digits

        def one(m: re.Match) -> str:
            low = 0 if m["star"] else 1 if m["plus"] else int(m["low"])
            return f"{m['lead'] or ''}{m['atom']}{{{low}, {max(low, cap - (1 if m['lead'] else 0))}}}"

        return run.sub(one, line)

    capped = "\n".join(bounded(line) for line in masked.split("\n"))
    return re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m[1])], capped)


def _rename_rule(ebnf: str, old: str, new: str) -> str:
    """`ebnf` with the rule `old` renamed wherever it is an identifier (not inside a "string"
    or a [character class])."""
    out, i, n = [], 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c in '"[':
            close, j = '"' if c == '"' else "]", i + 1
            while j < n and ebnf[j] != close:
                j += 2 if ebnf[j] == "\\" else 1
            out.append(ebnf[i : j + 1])
            i = j + 1
        elif match := IDENTIFIER.match(ebnf, i):
            out.append(new if match.group() == old else match.group())
            i = match.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Grammars:
    """xgrammar over one tokenizer: compiles constraints (cached) and makes matchers."""

    def __init__(self, tokenizer, vocab_size: int, token_bytes, max_digits: int = DEFAULT_JSON_MAX_DIGITS) -> None:
        """`max_digits`: the most digits a JSON number's integer part (and fraction) may have
        where its schema leaves it unbounded (`capped_digits`)."""
        try:
            import xgrammar as xgr
        except ImportError:
            raise ValueError(
                "structured outputs need xgrammar: pip install --no-deps xgrammar apache-tvm-ffi"
            ) from None

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=True)
        self.vocab_size = vocab_size
        self.max_digits = max_digits
        self._json_ebnf: dict[str, str] = {}  # schema text -> its capped grammar (json_ebnf)
        size = min(vocab_size, len(tokenizer))
        control = [any(b < 0x20 for b in token_bytes.bytes(i)) for i in range(size)] + [False] * (vocab_size - size)
        self.control_tokens = torch.tensor(control)  # raw control bytes: never legal in JSON text

    def compile(self, so: StructuredOutput):
        """The compiled grammar; ValueError with xgrammar's message when it refuses the spec
        (or naming the size limit it exceeds)."""
        if so.kind in ("regex", "grammar", "tool_calls"):  # json and choice were checked when built
            check_limits(so.kind, so.spec, json.loads(so.spec)["schema"] if so.kind == "tool_calls" else None)
        try:
            if so.kind == "json":
                return self.compiler.compile_grammar(self.json_ebnf(so.spec))
            if so.kind == "regex":
                return self.compiler.compile_regex(so.spec)
            if so.kind == "choice":
                alternatives = " | ".join(json.dumps(c) for c in json.loads(so.spec))  # EBNF string literals
                return self.compiler.compile_grammar(f"root ::= {alternatives}")
            if so.kind == "grammar":
                return self.compiler.compile_grammar(so.spec)
            if so.kind == "tool_calls":
                return self.compiler.compile_grammar(self._tool_calls_ebnf(json.loads(so.spec)))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{so.kind}: the grammar engine refused it: {exc}") from None
        raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {so.kind!r}")

    def _tool_calls_ebnf(self, spec: dict) -> str:
        """`<tool_call>\n{payload}\n</tool_call>`, once or (spec["parallel"]) one or more times
        separated by newlines, the payload JSON under spec["schema"] (serve.api.tools)."""
        payload = self.json_ebnf(json.dumps(spec["schema"]))
        repeat = ' ("\\n" call)*' if spec["parallel"] else ""
        return f'root ::= call{repeat}\ncall ::= "<tool_call>\\n" tool_payload "\\n</tool_call>"\n' + _rename_rule(
            payload, "root", "tool_payload"
        )

    def json_ebnf(self, schema: str) -> str:
        """The grammar of JSON valid under `schema` (its text), compact, numbers' digits capped."""
        if schema not in self._json_ebnf:  # converted once per schema: every sequence's matcher compiles it again
            if len(self._json_ebnf) >= JSON_EBNF_CACHE:
                self._json_ebnf.clear()
            ebnf = str(self.xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
            self._json_ebnf[schema] = capped_digits(ebnf, self.max_digits)
        return self._json_ebnf[schema]

    def matcher(self, so: StructuredOutput):
        return self.xgr.GrammarMatcher(self.compile(so))

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list, json_rows: list[int]) -> None:
        """Mask each listed row of `logits` in place to what its matcher allows next."""
        bitmask = self.xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        for row, matcher in zip(rows, matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
        if json_rows:
            logits[json_rows] = logits[json_rows].masked_fill(self.control_tokens[: logits.shape[1]], float("-inf"))
