"""The OpenAI-compatible server, driven over HTTP with the official `openai` client.

A live uvicorn server runs in a thread on a free 127.0.0.1 port. Most tests serve a tiny
random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer and chat template, so they
exercise the whole path (chat template, engine, streaming, errors, metrics) in seconds; its
text is gibberish, so they check structure, not content. One test serves the real SmolLM2.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from serve.api import build_app
from serve.async_engine import AsyncEngine
from serve.config import EngineConfig
from serve.engine.llm_engine import LLMEngine
from serve.weights import resolve_model

API_KEY = "test-key"


class LiveServer:
    """uvicorn serving `build_app(backend)` in a background thread."""

    def __init__(self, backend: AsyncEngine, api_key: str | None = None, **app_options) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.backend = backend
        self.url = f"http://127.0.0.1:{port}"
        app = build_app(backend, api_key=api_key, **app_options)
        self.app_metrics = app.state.metrics
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.backend.close()


def serve(
    model: Path, api_key: str | None = API_KEY, max_queue: int = 64, app_options: dict | None = None, **config
) -> LiveServer:
    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", **config))
    return LiveServer(AsyncEngine(engine, max_queue=max_queue), api_key=api_key, **(app_options or {}))


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (and so its vocabulary and chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[LiveServer]:
    live = serve(tiny_model, max_model_len=256, max_num_seqs=8, kv_cache_bytes=8 << 20)
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return server.backend.model_name


def http(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


# ---- the happy paths -----------------------------------------------------------------------


def test_health_and_models(server, client, model_name):
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_a_served_model_is_retrieved_and_any_other_name_is_openais_404(server, client, model_name):
    """GET /v1/models/{model}, the client's `models.retrieve`: the served name's card (the one
    the list holds), OpenAI's error body for any other name, a name with a slash included."""
    card = client.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model" and card.owned_by == "ministack"
    assert card.model_dump() | {"created": 0} == client.models.list().data[0].model_dump() | {"created": 0}
    for name in ("gpt-9", "org/gpt-9"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(name)
        error = missing.value.body
        assert (
            error["param"] == "model"
            and error["code"] == "model_not_found"
            and error["type"] == "invalid_request_error"
        )
        assert name in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/v1/models/{model_name}").status_code == 401  # guarded like the list


def test_chat_completion_reports_usage_and_flops(client, model_name):
    r = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    flops = r.usage.model_extra["flops"]
    assert flops["measured"] > 0 and flops["law_2NT"] > 0
    assert sum(flops["by_part"].values()) == flops["measured"]


def test_completion_with_token_ids_logprobs_and_n(client, model_name):
    r = client.completions.create(
        model=model_name,
        prompt=[1, 2, 3, 4],
        max_tokens=5,
        logprobs=2,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 5
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 10


def test_a_batch_of_prompts_gets_n_choices_each_indexed_prompt_times_n(client, model_name):
    greedy = dict(model=model_name, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    prompts = ["Once upon a time", "The capital of France"]
    alone = [client.completions.create(prompt=p, **greedy).choices[0].text for p in prompts]
    r = client.completions.create(prompt=prompts, n=2, **greedy)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == sum(
        client.completions.create(prompt=p, **greedy).usage.prompt_tokens for p in prompts
    )
    ids = client.completions.create(prompt=[[1, 2, 3], [4, 5]], **greedy)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
    streamed = {}
    chunks = list(
        client.completions.create(prompt=prompts, n=2, stream=True, stream_options={"include_usage": True}, **greedy)
    )
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in r.choices} and chunks[-1].usage.completion_tokens == 16


def test_echo_prepends_the_prompt_streamed_or_not(client, model_name):
    greedy = dict(model=model_name, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(prompt="Once upon a time", **greedy).choices[0].text
    assert (
        client.completions.create(prompt="Once upon a time", echo=True, **greedy).choices[0].text
        == "Once upon a time" + plain
    )
    chunks = list(client.completions.create(prompt="Once upon a time", echo=True, stream=True, **greedy))
    assert chunks[0].choices[0].text == "Once upon a time"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon a time" + plain


def test_echo_with_logprobs_scores_the_prompt_too(client, model_name, server):
    """OpenAI's legacy echo + logprobs: the prompt's tokens lead the logprobs (the first one's
    null), then the generated ones, streamed (in the first chunk) or not."""
    greedy = dict(model=model_name, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    tokenizer = server.backend.tokenizer
    prompt_ids = tokenizer.encode("Once upon a time")
    whole = client.completions.create(prompt="Once upon a time", echo=True, **greedy).choices[0]
    plain = client.completions.create(prompt="Once upon a time", **greedy).choices[0]
    lp = whole.logprobs
    assert whole.text == "Once upon a time" + plain.text
    assert lp.tokens == [tokenizer.decode([t]) for t in prompt_ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.token_logprobs[len(prompt_ids) :] == pytest.approx(plain.logprobs.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(prompt_ids)] == len("Once upon a time")
    chunks = [
        c for c in client.completions.create(prompt="Once upon a time", echo=True, stream=True, **greedy) if c.choices
    ]
    assert chunks[0].choices[0].text.startswith("Once upon a time")
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == lp.tokens
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), [])[1:] == pytest.approx(lp.token_logprobs[1:])


def test_completions_without_max_tokens_or_with_null_get_openais_16(client, model_name):
    """OpenAI's default for /v1/completions: null (what clients send for "not set") is 16 too,
    never a completion that fills the context; streamed and not."""
    for unset in ({}, {"max_tokens": None}):
        kw = dict(model=model_name, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True}, **unset)
        r = client.completions.create(**kw)
        assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage.completion_tokens == 16
        assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_greedy_stop_string_trims_the_text(client, model_name):
    full = (
        client.completions.create(
            model=model_name, prompt="Once upon a time", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"the greedy text {full!r} has no usable stop string"
    cut = client.completions.create(
        model=model_name,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_streaming_chat_matches_non_streaming_and_ends_with_usage(client, model_name):
    kwargs = dict(
        model=model_name,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_chat_streams_role_rides_on_each_choices_first_token(client, model_name):
    """No chunk before prefill (a client stamps time-to-first-token on the first chunk): each
    choice's first chunk carries the role with its first content, as vLLM sends it; an answer
    with no content at all gets the role with its finish."""
    kw = dict(model=model_name, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, seed=1)
    chunks = list(client.chat.completions.create(stream=True, n=2, max_tokens=6, **kw))
    firsts = {}
    for chunk in chunks:
        for c in chunk.choices:
            firsts.setdefault(c.index, c)
            assert (c.delta.role == "assistant") == (c is firsts[c.index]), chunk
    assert chunks[0].choices[0] is firsts[chunks[0].choices[0].index] and set(firsts) == {0, 1}
    assert all(c.delta.content for c in firsts.values())
    first_text = client.chat.completions.create(max_tokens=1, **kw).choices[0].message.content
    assert first_text
    (only,) = [
        c
        for chunk in client.chat.completions.create(stream=True, max_tokens=4, stop=[first_text], **kw)
        for c in chunk.choices
    ]
    assert (only.delta.role, only.delta.content, only.finish_reason) == ("assistant", "", "stop")


def test_chat_logprobs_one_entry_per_token_streamed_or_not(client, model_name):
    kwargs = dict(
        model=model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        e
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert len(whole) == len(streamed) == 6
    assert [e.token for e in whole] == [e.token for e in streamed]
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in whole)


def spelled(tokens: list[str]) -> bytes:
    """Legacy logprobs' tokens joined as bytes (a token holding part of a character is named by
    its escaped bytes, "\\xf0\\x9f")."""
    return b"".join(
        bytes.fromhex(t.replace("\\x", "")) if re.fullmatch(r"(\\x[0-9a-f]{2})+", t) else t.encode() for t in tokens
    )


def test_logprobs_leave_out_the_tokens_of_a_character_max_tokens_cut(client, model_name):
    """An emoji is two or more of SmolLM2's byte tokens (the grammar writes only emojis, however
    it splits them); max_tokens ending inside one drops the character from the text, and its
    tokens from the logprobs: their joined bytes are the text's, streamed and not."""
    cut = 0
    for max_tokens in range(1, 7):
        kw = dict(
            model=model_name, max_tokens=max_tokens, temperature=1.0, seed=0, extra_body={"guided_regex": "(🙂){8}"}
        )
        whole = client.chat.completions.create(messages=[{"role": "user", "content": "Smile"}], logprobs=True, **kw)
        content, entries = whole.choices[0].message.content, whole.choices[0].logprobs.content
        assert b"".join(bytes(e.bytes) for e in entries) == content.encode() and set(content) <= {"🙂"}
        cut += whole.usage.completion_tokens > len(entries)
        chunks = [
            c
            for chunk in client.chat.completions.create(
                messages=[{"role": "user", "content": "Smile"}], logprobs=True, stream=True, **kw
            )
            for c in chunk.choices
        ]
        assert "".join(c.delta.content or "" for c in chunks) == content
        assert [(e.token, e.bytes) for c in chunks if c.logprobs for e in c.logprobs.content] == [
            (e.token, e.bytes) for e in entries
        ]
        legacy = client.completions.create(prompt="Smile:", logprobs=1, **kw).choices[0]
        assert spelled(legacy.logprobs.tokens) == legacy.text.encode() and len(legacy.logprobs.text_offset) == len(
            legacy.logprobs.tokens
        )
        streamed = [
            c
            for chunk in client.completions.create(prompt="Smile:", logprobs=1, stream=True, **kw)
            for c in chunk.choices
        ]
        assert "".join(c.text for c in streamed) == legacy.text
        assert sum((c.logprobs.tokens for c in streamed), []) == legacy.logprobs.tokens
    assert cut  # max_tokens ended inside a character at least once


def test_streaming_completion_is_sse_ending_in_done(server, model_name):
    with http(server).stream(
        "POST",
        "/v1/completions",
        json={"model": model_name, "prompt": "Hi", "max_tokens": 4, "stream": True, "ignore_eos": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert len(events) == 5  # one token per chunk, then [DONE]


def test_tokenize_and_detokenize(server, model_name):
    h = http(server)
    tokens = h.post("/tokenize", json={"model": model_name, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    assert h.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Hello world"
    chat = h.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"]  # the chat template wraps the message


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", b'{"prompt": "x", ', 400, None),  # invalid JSON
        ("/v1/completions", {"prompt": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),  # an empty prompt in a batch
        ("/v1/completions", {"prompt": [[5] * 10, [5] * 300]}, 400, "prompt.1"),  # the batch's second is too long
        (
            "/v1/completions",
            {"prompt": "x", "echo": True, "logprobs": 21},
            400,
            "logprobs",
        ),  # past the top-20 OpenAI allows
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [5] * 300}, 400, "prompt"),  # longer than max_model_len
        ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),  # not a token id
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param):
    h = http(server)
    r = (
        h.post(path, content=body, headers={"content-type": "application/json"})
        if isinstance(body, bytes)
        else h.post(path, json=body)
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}


def test_openai_client_raises_typed_errors(client, model_name):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model_name, prompt="x", temperature=-0.5)


def test_api_key_is_required(server, model_name):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # guarded too, unless --public-metrics
    assert httpx.get(f"{server.url}/health").status_code == 200  # the one route open to all


def test_client_disconnect_mid_stream_frees_the_request(server, model_name):
    before = server.backend.stats()
    with http(server).stream(
        "POST",
        "/v1/completions",
        json={
            "model": model_name,
            "prompt": "Tell me a long story",
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.backend.stats().num_running == 1
    # leaving the block closed the connection mid-stream
    assert wait_until(lambda: server.backend.stats().num_running == 0)
    stats = server.backend.stats()
    assert stats.num_waiting == 0 and stats.kv_usage == before.kv_usage == 0.0


def test_client_giving_up_on_a_non_streaming_request_aborts_it(server, model_name):
    """Quietly: no ASGI traceback in the server's log, the request counted as aborted."""
    import logging

    class Errors(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.ERROR)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    errors, log = Errors(), logging.getLogger("uvicorn.error")
    log.addHandler(errors)
    try:
        before = server.app_metrics.success.copy()
        with pytest.raises(httpx.ReadTimeout):  # the client hangs up long before 250 tokens are ready
            http(server).post(
                "/v1/completions",
                json={"model": model_name, "prompt": "Hi", "max_tokens": 250, "ignore_eos": True},
                timeout=httpx.Timeout(60, read=0.3),
            )
        assert wait_until(lambda: server.backend.stats().num_running == 0)
        assert wait_until(lambda: server.app_metrics.success.get("abort", 0) == before.get("abort", 0) + 1)
        after = server.app_metrics.success
        assert {r: n for r, n in after.items() if r != "abort"} == {r: n for r, n in before.items() if r != "abort"}
        time.sleep(0.2)  # where a traceback would be logged
        assert not errors.records, [r.getMessage() for r in errors.records]
    finally:
        log.removeHandler(errors)


def test_metrics_use_vllm_names_with_sane_values(server, client, model_name):
    client.completions.create(model=model_name, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    text = http(server).get("/metrics").text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    label = f'{{model_name="{model_name}"}}'

    def metric(name: str) -> float:
        return sum(v for k, v in values.items() if k.startswith(name + "{") and "le=" not in k)

    assert values[f"vllm:num_requests_running{label}"] == 0 and values[f"vllm:num_requests_waiting{label}"] == 0
    assert 0.0 <= values[f"vllm:kv_cache_usage_perc{label}"] <= 1.0
    stats = server.backend.stats()
    assert values[f"ministack:kv_cache_capacity_tokens{label}"] == stats.max_tokens_in_cache
    info = f'vllm:cache_config_info{{model_name="{model_name}",cache_dtype="{stats.kv_cache_dtype}",block_size="16",num_blocks="{stats.max_tokens_in_cache // 16}"}}'
    assert values[info] == 1
    assert metric("vllm:request_success_total") >= 1
    assert metric("vllm:generation_tokens_total") >= 3 and metric("vllm:prompt_tokens_total") >= 1
    assert metric("vllm:prefix_cache_queries_total") >= metric("vllm:prefix_cache_hits_total") >= 0
    assert "vllm:num_preemptions_total" + label in values
    ttft = values[f"vllm:time_to_first_token_seconds_count{label}"]
    assert (
        ttft >= 1 and values[f'vllm:time_to_first_token_seconds_bucket{{model_name="{model_name}",le="+Inf"}}'] == ttft
    )
    assert values[f"vllm:inter_token_latency_seconds_count{label}"] >= 2
    tpot = values[f"vllm:request_time_per_output_token_seconds_count{label}"]  # one per finished request, as vLLM's
    assert tpot == values[f"vllm:e2e_request_latency_seconds_count{label}"] >= 1
    assert values[f"vllm:request_time_per_output_token_seconds_sum{label}"] > 0
    assert metric("ministack:measured_flops_total") > 0
    assert (
        "gpu_cache_usage_perc" not in text and "vllm:time_per_output_token_seconds" not in text
    )  # retired by vLLM: hidden


@pytest.mark.parametrize(
    "version, shown",
    [
        ((0, 10), {"vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"}),  # vLLM 0.10 served both
        ((0, 11), {"vllm:time_per_output_token_seconds"}),  # hidden in 0.12; the cache's old name already in 0.11
    ],
)
def test_retired_metric_names_come_back_only_behind_vllms_flag(server, version, shown):
    """--show-hidden-metrics-for-version: the names vLLM retired after `version`, beside their
    successors and with their values."""
    live = LiveServer(
        server.backend, api_key=API_KEY, hidden_metrics_version=version
    )  # a second app over the same engine
    try:
        live.client().completions.create(
            model=server.backend.model_name, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True}
        )
        lines = [line for line in http(live).get("/metrics").text.splitlines() if not line.startswith("#")]
    finally:
        live.server.should_exit = True
        live.thread.join(timeout=10)
    names = {line.split("{")[0].removesuffix("_count").removesuffix("_sum").removesuffix("_bucket") for line in lines}
    assert names & {"vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"} == shown
    assert {
        "vllm:kv_cache_usage_perc",
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
    } <= names
    value = {line.rpartition(" ")[0]: line.rpartition(" ")[2] for line in lines}
    label = f'{{model_name="{server.backend.model_name}"}}'
    for old, new in (
        ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
        ("vllm:time_per_output_token_seconds_count", "vllm:inter_token_latency_seconds_count"),
    ):
        if old.removesuffix("_count") in shown:
            assert value[old + label] == value[new + label]


def _counters(server: LiveServer, prefix: str) -> dict[str, float]:
    """The /metrics samples whose name starts with `prefix`, by name and labels."""
    lines = http(server).get("/metrics").text.splitlines()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if line.startswith(prefix))}


def test_metrics_count_bytes_beside_flops_under_vllms_mfu_names(server, client, model_name):
    before = _counters(server, "vllm:estimated_") | _counters(server, "ministack:bytes_moved_total")
    client.completions.create(model=model_name, prompt="Hi there", max_tokens=3, extra_body={"ignore_eos": True})
    after = _counters(server, "vllm:estimated_") | _counters(server, "ministack:bytes_moved_total")
    label = f'{{model_name="{model_name}"}}'
    for name in ("flops", "read_bytes", "write_bytes"):
        key = f"vllm:estimated_{name}_per_gpu_total{label}"
        assert after[key] > before.get(key, 0.0), key
    parts = {
        p: after[f'ministack:bytes_moved_total{{model_name="{model_name}",part="{p}"}}']
        for p in ("weights", "kv_read", "kv_write")
    }
    assert after[f"vllm:estimated_read_bytes_per_gpu_total{label}"] == parts["weights"] + parts["kv_read"]
    assert after[f"vllm:estimated_write_bytes_per_gpu_total{label}"] == parts["kv_write"]


def test_full_queue_answers_429_with_retry_after(tiny_model):
    """One running slot and room for one waiting request: a third request is refused."""
    live = serve(tiny_model, max_queue=1, max_model_len=512, max_num_seqs=1, kv_cache_bytes=8 << 20)
    try:
        h = http(live)
        body = {"prompt": "Hi", "max_tokens": 500, "stream": True, "ignore_eos": True}
        with h.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # its first token: it runs, it no longer waits
            with h.stream("POST", "/v1/completions", json=body) as waiting:
                assert running.status_code == waiting.status_code == 200
                assert wait_until(lambda: live.backend.stats().num_waiting == 1)
                with pytest.raises(openai.RateLimitError) as refused:
                    live.client().completions.create(model=live.backend.model_name, prompt="Hi", max_tokens=2)
                response = refused.value.response
                assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["message"].startswith("engine is overloaded")
        assert wait_until(lambda: live.backend.stats().num_running == live.backend.stats().num_waiting == 0)
    finally:
        live.close()


def test_real_smollm2_knows_the_capital_of_france(smollm2):
    live = serve(smollm2, api_key=None, max_model_len=512, kv_cache_bytes=64 << 20)
    try:
        r = live.client(api_key="unused").chat.completions.create(
            model=live.backend.model_name,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in r.choices[0].message.content
    finally:
        live.close()


def test_needle_harness_fills_each_context_and_draws_the_heatmap(server, tmp_path, capsys):
    from serve.needle import main as needle

    png = tmp_path / "needle.png"
    assert (
        needle(
            [
                "--url",
                server.url,
                "--api-key",
                API_KEY,
                "--lengths",
                "96,192",
                "--depths",
                "0,1",
                "--max-tokens",
                "4",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| 96 |" in table and "| 192 |" in table and "/4 found" in table
    assert (
        "cut off" in table and "cut off by --max-tokens: raise it" in table
    )  # a random model's 4 tokens end at the budget
    assert png.stat().st_size > 1000


def test_needle_table_tells_a_cut_off_answer_from_a_miss():
    from serve.needle import Trial, table

    trials = [
        Trial(512, 0.0, "quokka", answer='The passphrase is "quokka".'),
        Trial(512, 0.5, "quokka", answer='The secret passphrase mentioned in the text is "quok', cut=True),
        Trial(512, 1.0, "quokka", answer="I do not know."),
    ]
    text = table(trials, [512], [0.0, 0.5, 1.0])
    assert "| 512 | found | cut off | missed |" in text and "1/3 found (1 missed answers were cut off" in text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's own traceback
def test_a_dead_engine_fails_its_requests_and_its_health_check(tiny_model):
    live = serve(tiny_model, max_model_len=256)
    try:

        def broken_step():
            raise RuntimeError("simulated kernel fault")

        live.backend.engine.step = broken_step
        assert httpx.get(f"{live.url}/health").status_code == 200
        response = http(live).post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        error = response.json()["error"]
        assert response.status_code == 503 and "simulated kernel fault" in error["message"]
        assert error["code"] == "engine_unavailable"
        assert wait_until(lambda: httpx.get(f"{live.url}/health").status_code == 503)
        later = http(live).post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
        )  # refused at once, never hangs
        assert later.status_code == 503 and "simulated kernel fault" in later.json()["error"]["message"]
    finally:
        live.server.should_exit = True
        live.thread.join(timeout=10)


def test_cli_server_steps_on_its_main_thread_and_drains_in_flight_streams_on_sigterm(tiny_model, tmp_path):
    """`ministack serve` as users start it: uvicorn on a second thread, the step loop on the main
    one (serve.cli.serve_http). SIGTERM lets a stream in flight finish, the disk tier's queued
    writes land, then the process exits 0."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "--model",
            str(tiny_model),
            "--port",
            str(port),
            "--max-model-len",
            "256",
            "--kv-cache-gb",
            "0.01",
            "--embedding-model",
            "none",
            "--log-level",
            "warning",
            "--kv-cache-disk",
            str(tmp_path / "disk"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(f"{url}/health"), timeout=180), "server did not start"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        stream = client.completions.create(
            model=client.models.list().data[0].id,
            prompt="Once",
            max_tokens=200,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert (
            "".join(c.choices[0].text for c in chunks if c.choices) and chunks[-1].choices[0].finish_reason == "length"
        )
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
        assert len(list((tmp_path / "disk").glob("*.safetensors"))) == (1 + 200) // 16  # every full block of the answer
    finally:
        proc.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_cache_smaller_than_the_context_caps_it_and_requests_without_max_tokens_still_run(tiny_model):
    live = serve(tiny_model, api_key=None, kv_cache_bytes=64 << 10)  # a few hundred tokens; the model's context is 512
    try:
        capacity = live.backend.engine.max_tokens_in_cache
        assert capacity < 512 and httpx.get(f"{live.url}/v1/models").json()["data"][0]["max_model_len"] == capacity
        r = http(live).post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= capacity
    finally:
        live.close()
