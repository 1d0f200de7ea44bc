"""Tool calling in the Hermes format (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
the format of ChatML tool models: Hermes, Qwen 2.5, and what vLLM's `hermes` parser reads).

- Rendering: a chat template that takes `tools` gets them (and the messages' `tool_calls`) as
  transformers passes them; a template that does not (SmolLM2's) gets the tools described in
  the system message, earlier tool calls written as `<tool_call>` blocks, and tool results as
  `<tool_response>` blocks.
- `tool_choice`: `none` renders no tools; `auto` lets the model choose, and its `<tool_call>`
  blocks are parsed out of the text; `required` and a named function are forced by a grammar
  (serve.engine.structured, kind "tool_calls"), so they always parse, with arguments valid
  under the function's `parameters` schema.
- Streaming: text is sent as content until a `<tool_call>` opens (a tail that may begin one is
  held back, as stop strings are); from there the calls are collected and sent at the end as
  OpenAI's `tool_calls` deltas (id, type and name first, then the arguments).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from serve.engine.json_schema import enforceable
from serve.engine.structured import StructuredOutput

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _describe(tools: list[dict]) -> str:
    signatures = "\n".join(json.dumps(t["function"], sort_keys=True) for t in tools)
    return (
        "You may call functions to answer. Their signatures, one JSON object a line, inside <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call one, answer with a JSON object of its name and arguments inside <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
    )


def render_messages(messages: list[dict], tools: list[dict] | None, template: str) -> tuple[list[dict], dict[str, Any]]:
    """(messages, extra apply_chat_template arguments) for `template`. `messages` are OpenAI's
    (dicts: role, content, tool_calls, tool_call_id)."""
    if "tools" in template:  # the template renders tools and tool calls itself (transformers' convention)
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": json.loads(c["function"]["arguments"]),
                        },
                    }
                    for c in m["tool_calls"]
                ]
            out.append({k: v for k, v in m.items() if v is not None})
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = [
                f'{OPEN}\n{{"name": {json.dumps(c["function"]["name"])}, "arguments": {c["function"]["arguments"]}}}\n{CLOSE}'
                for c in m["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
        if m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + _describe(tools)}
        else:
            out.insert(0, {"role": "system", "content": _describe(tools)})
    return out, {}


def tool_grammar(tools: list[dict], name: str | None, parallel: bool) -> StructuredOutput:
    """The grammar forcing `required` (any of `tools`; one or more calls when `parallel`) or the
    function `name` (exactly one call). Raises ValueError naming a parameters keyword the
    engine would not enforce, or a parameters schema no arguments can match."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    payloads = []
    for f in chosen:
        parameters = enforceable(
            f.get("parameters") or {"type": "object", "properties": {}}, f"tools.{f['name']}.parameters"
        )
        payloads.append(
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = payloads[0] if len(payloads) == 1 else {"anyOf": payloads}
    return StructuredOutput("tool_calls", json.dumps({"schema": schema, "parallel": parallel and name is None}))


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool calls) from a Hermes-format answer. With calls, the content is the
    text outside them, or None when that is only whitespace; without, the text itself. A block
    that is not a JSON object with a string name stays in the content."""
    calls, outside, at = [], [], 0
    for match in CALL.finditer(text):
        try:
            payload = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            continue
        calls.append(
            {
                "id": call_id(),
                "type": "function",
                "function": {"name": payload["name"], "arguments": json.dumps(payload.get("arguments", {}))},
            }
        )
        outside.append(text[at : match.start()])
        at = match.end()
    if not calls:
        return text, []
    content = "".join(outside) + text[at:]
    return (content if content.strip() else None), calls


class ToolStream:
    """One choice's streamed text split into content sent as it comes and tool calls sent at
    the end; what it sends joins to what `parse_tool_calls` gives for the whole text."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.opened = False  # a <tool_call> began: the rest waits for the end

    def content(self, new_text: str) -> str:
        """The content to send now: text before any <tool_call>, minus a tail that may begin
        one and trailing whitespace (content that is only whitespace is no content)."""
        self.text += new_text
        if self.opened:
            return ""
        at = self.text.find(OPEN, self.sent)
        if at >= 0:
            self.opened, end = True, at
        else:
            end = len(self.text) - next(
                (k for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1) if self.text.endswith(OPEN[:k])), 0
            )
        end = max(self.sent, len(self.text[:end].rstrip()))
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, the tool calls) once the choice has ended."""
        content, calls = parse_tool_calls(self.text)
        return (content or "")[self.sent :], calls
