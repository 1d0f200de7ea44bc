"""Requests replayed from public serving bug reports, against the real SmolLM2 over HTTP with
the official `openai` client (its text means something here, unlike the tiny random model's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_serve_api import LiveServer, serve, smollm2  # noqa: F401 (fixture)

EMOJI = [{"role": "user", "content": "Reply with exactly three emojis about a party and nothing else."}]


@pytest.fixture(scope="module")
def real(smollm2) -> Iterator[LiveServer]:
    live = serve(smollm2, api_key=None, max_model_len=512, kv_cache_bytes=64 << 20)
    yield live
    live.close()


def test_logprob_bytes_of_split_characters_join_to_the_content(real):
    """Byte-level BPE spells an emoji over several tokens; each logprob entry (and each
    alternative) carries its token's own bytes, so the joined bytes are the content's UTF-8."""
    client, name = real.client(api_key="x"), real.backend.model_name
    kw = {"model": name, "messages": EMOJI, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    r = client.chat.completions.create(**kw)
    content, entries = r.choices[0].message.content, r.choices[0].logprobs.content
    assert any(ord(ch) > 0xFFFF for ch in content), content  # an emoji: split over tokens
    joined = b"".join(
        bytes(e.bytes) for e in entries if e.token != "<|im_end|>"
    )  # the stop token's text is not content
    assert joined.decode("utf-8", errors="ignore") == content  # ignore: a last character cut by max_tokens
    replacement = list("\ufffd".encode())
    for e in entries:
        assert e.bytes != replacement and all(t.bytes != replacement for t in e.top_logprobs)
    streamed = [
        e
        for chunk in client.chat.completions.create(stream=True, **kw)
        for c in chunk.choices
        for e in (c.logprobs.content if c.logprobs else [])
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx(
        [e.logprob for e in entries], abs=1e-3
    )  # the prefix cache's rounding


def test_legacy_completions_tokens_and_offsets_follow_the_text(real):
    client, name = real.client(api_key="x"), real.backend.model_name
    prompt = "<|im_start|>user\nReply with exactly three emojis about a party and nothing else.<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert any(ord(ch) > 0xFFFF for ch in text) and lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset):
        if not token.startswith("\\x") and token not in ("<|im_end|>",):  # a whole-character token sits at its offset
            assert text[offset : offset + len(token)] == token, (token, offset, text)


def test_continue_final_message_continues_the_assistant_turn(real):
    """Assistant prefill: the partial answer is continued in place, not answered in a new turn."""
    client, name = real.client(api_key="x"), real.backend.model_name
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    r = client.chat.completions.create(
        model=name,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert r.choices[0].message.content.startswith(" Paris"), r.choices[0].message.content


def test_a_forced_tool_call_carries_the_asked_city(real):
    """tool_choice names the function: the grammar writes the call's shape, the model fills in the city."""
    import json

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    client, name = real.client(api_key="x"), real.backend.model_name
    r = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
    )
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "Paris" in json.loads(call.function.arguments)["city"], call.function.arguments
