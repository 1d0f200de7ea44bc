"""Tool calling (serve/api/tools.py) through the official `openai` client: tool_choice none,
auto, required and a named function, parallel calls, the streamed deltas in OpenAI's shape
(reassembled by the client's own streaming helper), and tool results continuing the chat."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_serve_api import LiveServer, http, serve, smollm2, tiny_model  # noqa: F401 (fixtures)
from test_serve_api_fields import CHAT, chat

from serve.api.tools import ToolStream, parse_tool_calls, render_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def server(tiny_model) -> LiveServer:
    live = serve(
        tiny_model, max_model_len=512, max_num_seqs=8, kv_cache_bytes=16 << 20
    )  # room for the tools in the prompt
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return server.backend.model_name


def test_parser_splits_content_and_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert [c["function"]["name"] for c in calls] == ["get_time"] and json.loads(calls[0]["function"]["arguments"]) == {
        "zone": "UTC"
    }
    assert content == "Let me check.\n\n<tool_call>\nnot json\n</tool_call>" and calls[0]["id"].startswith("call_")
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert (
        parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n')[0] is None
    )  # only whitespace left


@pytest.mark.parametrize(
    "pieces",
    [
        ["Sure", ", checking.", "\n<tool", '_call>\n{"name": "f", "arguments": {}}', "\n</tool_call>"],
        ["Plain answer", " with <tool", " nothing after."],
        ["  ", "\n", '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'],
    ],
)
def test_streamed_split_joins_to_the_whole(pieces):
    stream = ToolStream()
    sent = "".join(stream.content(p) for p in pieces)
    rest, calls = stream.finish()
    content, whole = parse_tool_calls("".join(pieces))
    assert sent + rest == (content or "") and [c["function"] for c in calls] == [c["function"] for c in whole]
    assert "<tool" not in sent or not whole  # nothing of a call was streamed as content


def test_a_template_without_tools_gets_them_in_the_system_message():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "content": "12 C", "tool_call_id": "c1"},
    ]
    rendered, extra = render_messages(messages, [WEATHER], "{{ messages }}")
    assert extra == {} and rendered[0]["role"] == "system" and '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert rendered[3] == {"role": "tool", "content": "<tool_response>\n12 C\n</tool_response>"}
    native, extra = render_messages(messages, [WEATHER], "{% for t in tools %}{% endfor %}")
    assert extra == {"tools": [WEATHER]} and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def forced(client, model_name, tool_choice, parallel=True, n=1, stream=False, seed=0):
    return chat(
        client,
        model_name,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        n=n,
        seed=seed,
        temperature=1.0,
        max_tokens=160,
        stream=stream,
    )


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_always_parse_and_validate(client, model_name, tool_choice):
    """One call (a named function, or parallel_tool_calls false): the grammar ends the answer
    after it, so the random model always finishes with a valid call."""
    for seed in range(6):
        choice = forced(client, model_name, tool_choice, parallel=False, seed=seed).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function" and choice.message.content is None
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert isinstance(tool_choice, str) or call.function.name == "get_time"
        assert list(json.loads(call.function.arguments)) == list(
            SCHEMAS[call.function.name]["properties"]
        )  # in schema order


def test_parallel_calls_each_validate(client, model_name):
    """Parallel: the grammar allows another call after each; every complete one validates
    (the random model may keep calling until max_tokens, then finish_reason is length and the
    call it cut is dropped, never left as markup in the content)."""
    names = set()
    for seed in range(4):
        choice = forced(client, model_name, "required", seed=seed).choices[0]
        assert choice.message.tool_calls and choice.finish_reason in ("tool_calls", "length")
        assert choice.message.content is None
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            names.add(call.function.name)
    assert names == {"get_weather", "get_time"}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_by_max_tokens_is_a_length_finish_with_no_markup(client, model_name, tool_choice):
    """max_tokens ends the call mid-way: finish_reason length, no content (the grammar writes only
    calls, so the cut text is markup), no call with arguments that do not parse; streamed the same."""
    for max_tokens in (3, 12):
        kw = dict(
            tools=[WEATHER, TIME],
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            seed=0,
            temperature=1.0,
            max_tokens=max_tokens,
        )
        choice = chat(client, model_name, **kw).choices[0]
        assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == ("length", None, None), (
            choice
        )
        deltas = [c for chunk in chat(client, model_name, stream=True, **kw) for c in chunk.choices]
        assert not any(d.delta.content or d.delta.tool_calls for d in deltas), deltas
        assert deltas[0].delta.role == "assistant" and [d.finish_reason for d in deltas if d.finish_reason] == [
            "length"
        ]


def test_streamed_tool_calls_match_and_the_clients_helper_reassembles_them(client, model_name):
    """Parallel calls, n = 2: the deltas rebuild the non-streamed calls, each choice finishes
    once; the client's `stream()` helper reassembles a single call (on parallel calls cut by
    max_tokens it raises LengthFinishReasonError, as it should)."""
    whole = forced(client, model_name, "required", n=2, seed=3)
    calls: dict[tuple[int, int], dict] = {}
    reasons, finishes = {}, []
    for chunk in forced(client, model_name, "required", n=2, seed=3, stream=True):
        for c in chunk.choices:
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
            finishes += [c.index] if c.finish_reason else []
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault((c.index, d.index), {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    for choice in whole.choices:
        got = [calls[(choice.index, i)] for i in range(len(choice.message.tool_calls))]
        assert [(g["name"], g["arguments"]) for g in got] == [
            (t.function.name, t.function.arguments) for t in choice.message.tool_calls
        ]
        assert all(g["id"].startswith("call_") for g in got) and reasons[choice.index] == choice.finish_reason
    assert max(i for _, i in calls) >= 1  # several calls in one choice: deltas of more than one index
    (first,) = next(iter(forced(client, model_name, "required", seed=3, stream=True))).choices
    assert (
        first.delta.role == "assistant" and first.delta.tool_calls and first.delta.content is None
    )  # the role rides on the first call
    assert sorted(finishes) == [0, 1]
    with client.beta.chat.completions.stream(
        model=model_name,
        messages=CHAT,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        seed=3,
        temperature=1.0,
        max_tokens=160,
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content is None  # as in the non-streamed answer
    first = forced(client, model_name, "required", parallel=False, seed=3).choices[0].message.tool_calls
    assert [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls] == [
        (t.function.name, t.function.arguments) for t in first
    ]


def test_tool_choice_none_and_auto_answer_in_text(client, model_name):
    for tool_choice in ("none", "auto"):
        r = chat(client, model_name, tools=[WEATHER], tool_choice=tool_choice, max_tokens=8, seed=1, temperature=1.0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_tool_results_continue_the_conversation(server, client, model_name):
    first = forced(client, model_name, {"type": "function", "function": {"name": "get_weather"}}).choices[0].message
    messages = CHAT + [
        first,  # the response's message object as it is, the way applications send it back
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "12 degrees and rain"},
    ]
    r = chat(client, model_name, messages=messages, tools=[WEATHER], max_tokens=4, seed=0, temperature=1.0)
    dumped = [m if isinstance(m, dict) else m.model_dump() for m in messages]
    bare = http(server).post("/tokenize", json={"messages": dumped}).json()["count"]
    rendered = http(server).post("/tokenize", json={"messages": dumped, "tools": [WEATHER]}).json()["count"]
    assert r.usage.prompt_tokens == rendered > bare  # the tools' description joins the system message


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"messages": [{"role": "tool", "content": "1"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
        ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a1"}}]}, "messages.0.audio"),
    ],
)
def test_tool_mistakes_are_400s(server, extra, param):
    r = http(server).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4} | extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
