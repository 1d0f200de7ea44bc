"""The endpoints called as plain functions over an ApiContext, without HTTP or a test client.

The context serves the tiny random Llama the other serve tests use (SmolLM2's tokenizer and
chat template), so a handler runs the whole path (tokenizing, admission, the engine) in well
under a second; its text is gibberish, so the tests check structure and errors, not content.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi.responses import Response, StreamingResponse

from serve.api.admission import Prompt, check_model, room
from serve.api.chat import chat_completions
from serve.api.completions import completions
from serve.api.context import ApiContext
from serve.api.embeddings import embeddings
from serve.api.errors import ApiError, refused
from serve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from serve.api.status import health, models, prometheus
from serve.api.tokenize import detokenize, tokenize
from serve.async_engine import AsyncEngine
from serve.config import EngineConfig
from serve.engine.llm_engine import LLMEngine
from serve.engine.sampling_params import ParamError, SamplingParams
from test_serve_api import smollm2, tiny_model, wait_until  # noqa: F401 (fixtures)

MAX_MODEL_LEN = 256
GREEDY = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def ctx(tiny_model) -> Iterator[ApiContext]:
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model), dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=8, kv_cache_bytes=8 << 20
        )
    )
    backend = AsyncEngine(engine, max_queue=64)
    yield ApiContext.create(backend)
    backend.close()


async def connected() -> dict:
    """An ASGI channel whose client never leaves."""
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def gone() -> dict:
    """An ASGI channel whose client has already left."""
    return {"type": "http.disconnect"}


def answer(handler, *args) -> tuple[Response, str]:
    """Run `handler(*args)` and read its whole body (a stream's events), on one event loop."""

    async def run() -> tuple[Response, str]:
        response = await handler(*args)
        if isinstance(response, StreamingResponse):
            return response, "".join([chunk async for chunk in response.body_iterator])
        return response, response.body.decode()

    return asyncio.run(run())


def refusal(handler, *args) -> ApiError:
    with pytest.raises(ApiError) as err:
        answer(handler, *args)
    return err.value


def events(text: str) -> list[dict | str]:
    return [
        json.loads(line[6:]) if line[6:].startswith("{") else line[6:]
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def idle(ctx: ApiContext) -> bool:
    stats = ctx.backend.stats()
    return stats.num_running == 0 and stats.num_waiting == 0


# ---- status, tokenize ------------------------------------------------------------------------


def test_status_endpoints(ctx):
    assert asyncio.run(health(ctx)).status_code == 200
    listed = asyncio.run(models(ctx))
    assert [(m["id"], m["max_model_len"]) for m in listed["data"]] == [(ctx.backend.model_name, MAX_MODEL_LEN)]
    scrape = asyncio.run(prometheus(ctx))
    assert scrape.media_type.startswith("text/plain") and b"vllm:num_requests_running" in scrape.body


def test_tokenize_and_detokenize_round_trip(ctx):
    tokens = asyncio.run(tokenize(ctx, TokenizeRequest.model_validate({"prompt": "hello world"})))
    assert tokens["count"] == len(tokens["tokens"]) >= 2 and tokens["max_model_len"] == MAX_MODEL_LEN
    assert len(tokens["token_strs"]) == tokens["count"]
    text = asyncio.run(detokenize(ctx, DetokenizeRequest.model_validate({"tokens": tokens["tokens"]})))
    assert text == {"prompt": "hello world"}
    chat = asyncio.run(tokenize(ctx, TokenizeRequest.model_validate({"messages": CHAT})))
    assert chat["count"] > tokens["count"]  # the template wraps the message in its role markers


def test_detokenize_refuses_ids_outside_the_vocabulary_naming_the_field(ctx):
    error = refusal(detokenize, ctx, DetokenizeRequest.model_validate({"tokens": [1, ctx.vocab_size]}))
    assert error.status == 400 and error.param == "tokens" and str(ctx.vocab_size) in error.message


# ---- admission -------------------------------------------------------------------------------


def test_room_is_what_the_context_leaves_and_max_tokens_past_it_is_refused(ctx):
    prompt = Prompt([1, 2, 3], "prompt")
    assert room(ctx, prompt, None) == MAX_MODEL_LEN - 3 and room(ctx, prompt, 10) == 10
    with pytest.raises(ApiError) as err:
        room(ctx, prompt, MAX_MODEL_LEN)
    assert err.value.param == "max_tokens"
    with pytest.raises(ApiError) as err:
        room(ctx, Prompt([5] * MAX_MODEL_LEN, "prompt.1"), None)
    assert err.value.param == "prompt.1"


def test_an_unknown_model_is_a_404_naming_model(ctx):
    check_model(ctx, None)
    check_model(ctx, ctx.backend.model_name)
    with pytest.raises(ApiError) as err:
        check_model(ctx, "gpt-9")
    assert (err.value.status, err.value.param, err.value.code) == (404, "model", "model_not_found")


def test_the_engine_names_the_refused_setting_as_data():
    with pytest.raises(ParamError) as err:
        SamplingParams(stop_token_ids=[-1]).validate()
    assert err.value.param == "stop_token_ids" and refused(err.value).param == "stop_token_ids"
    assert refused(ValueError("prompt is empty")).param is None  # no setting to blame: no field named


# ---- completions -----------------------------------------------------------------------------


def test_a_completion_answers_whole_with_its_usage(ctx):
    body = CompletionRequest.model_validate({"prompt": ["Once upon", "a time"], **GREEDY})
    response, text = answer(completions, ctx, body, "r1", connected)
    whole = json.loads(text)
    assert response.status_code == 200 and whole["id"] == "cmpl-r1" and whole["object"] == "text_completion"
    assert [c["index"] for c in whole["choices"]] == [0, 1] and {c["finish_reason"] for c in whole["choices"]} == {
        "length"
    }
    assert whole["usage"]["completion_tokens"] == 8 and whole["usage"]["flops"]["measured"] > 0


def test_a_bad_sampling_value_is_refused_before_anything_is_queued(ctx):
    body = CompletionRequest.model_validate({"prompt": "x", "stop_token_ids": [ctx.vocab_size]})
    error = refusal(completions, ctx, body, "r2", connected)
    assert error.status == 400 and error.param == "stop_token_ids"
    assert idle(ctx)


def test_a_setting_the_engine_refuses_is_a_400_naming_it(ctx):
    body = CompletionRequest.model_validate({"prompt": "x", "priority": 3})  # this engine schedules fcfs
    error = refusal(completions, ctx, body, "r3", connected)
    assert error.status == 400 and error.param == "priority" and "--scheduling-policy" in error.message


def test_a_client_gone_before_the_answer_gets_499_and_is_counted_aborted(ctx):
    aborted = ctx.metrics.success.get("abort", 0)
    body = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 200, "ignore_eos": True})
    response, _ = answer(completions, ctx, body, "r4", gone)
    assert response.status_code == 499 and ctx.metrics.success.get("abort", 0) == aborted + 1
    assert wait_until(lambda: idle(ctx))


# ---- chat, embeddings ------------------------------------------------------------------------


def test_a_chat_stream_spells_what_the_whole_answer_says(ctx):
    whole = json.loads(
        answer(
            chat_completions, ctx, ChatCompletionRequest.model_validate({"messages": CHAT, **GREEDY}), "c1", connected
        )[1]
    )
    stream = ChatCompletionRequest.model_validate({"messages": CHAT, **GREEDY, "stream": True})
    response, text = answer(chat_completions, ctx, stream, "c2", connected)
    sent = events(text)
    assert response.media_type == "text/event-stream" and sent[-1] == "[DONE]"
    assert sent[0]["id"] == "chatcmpl-c2" and sent[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(
        e["choices"][0]["delta"]["content"] or "" for e in sent[:-1] if e["choices"]
    )  # the first holds a token too
    assert content == whole["choices"][0]["message"]["content"] and whole["id"] == "chatcmpl-c1"


def test_chat_mistakes_are_refused_naming_the_field(ctx):
    no_tools = ChatCompletionRequest.model_validate({"messages": CHAT, "tool_choice": "required"})
    assert refusal(chat_completions, ctx, no_tools, "c3", connected).param == "tool_choice"
    untrusted = ChatCompletionRequest.model_validate({"messages": CHAT, "chat_template": "{{ messages }}"})
    assert refusal(chat_completions, ctx, untrusted, "c4", connected).param == "chat_template"
    too_long = ChatCompletionRequest.model_validate({"messages": CHAT, "max_tokens": MAX_MODEL_LEN})
    assert refusal(chat_completions, ctx, too_long, "c5", connected).param == "max_tokens"
    assert idle(ctx)


def test_embeddings_without_an_embedding_model_are_a_404(ctx):
    error = refusal(embeddings, ctx, EmbeddingRequest.model_validate({"input": "x"}))
    assert error.status == 404 and error.param == "model" and "no embedding model" in error.message
