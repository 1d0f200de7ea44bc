"""Every request field over HTTP with the official `openai` client: the sampling fields do
what they say (streamed and not, the same answer), inert fields are accepted, and any field
the server does not implement is a 400 naming it (fail closed), never a 200 that ignored it."""

from __future__ import annotations

import json

import openai
import pytest
from test_serve_api import client, http, model_name, serve, server, smollm2, tiny_model  # noqa: F401 (fixtures)

CHAT = [{"role": "user", "content": "Write a long sentence about the sea."}]
SEEDED = {"temperature": 1.0, "seed": 1}  # the tiny random model's greedy text is all newlines: sample it, reproducibly


def chat(client, model_name, **kw):
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(model=model_name, messages=kw.pop("messages", CHAT), extra_body=extra, **kw)


def streamed(client, model_name, **kw) -> dict[int, dict]:
    """The stream folded back into one choice per index: text, finish_reason, and the usage."""
    out: dict[int, dict] = {}
    usage = None
    for chunk in chat(client, model_name, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            entry = out.setdefault(c.index, {"text": "", "finish_reason": None})
            entry["text"] += c.delta.content or ""
            entry["finish_reason"] = c.finish_reason or entry["finish_reason"]
    return {"choices": out, "usage": (usage.prompt_tokens, usage.completion_tokens)}


def whole(client, model_name, **kw) -> dict:
    r = chat(client, model_name, **kw)
    return {
        "choices": {c.index: {"text": c.message.content, "finish_reason": c.finish_reason} for c in r.choices},
        "usage": (r.usage.prompt_tokens, r.usage.completion_tokens),
    }


# ---- fail closed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),  # OpenAI's deprecated form: use tools
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}]},
            "messages.0.content.0.type",
        ),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/chat/completions", {"presence_penalty": 5.0}, "presence_penalty"),  # outside OpenAI's -2..2
        ("/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ("/v1/chat/completions", {"stream": True, "stream_options": {"continuous": True}}, "stream_options.continuous"),
        (
            "/v1/chat/completions",
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options",
        ),
        ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),  # not a token id of this vocabulary
        ("/v1/chat/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
        ("/v1/chat/completions", {"min_p": 1.5}, "min_p"),
        ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/chat/completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ("/v1/chat/completions", {"store": True}, "store"),
    ],
)
def test_what_is_not_implemented_or_out_of_range_is_a_400_naming_it(server, path, extra, param):
    body = ({"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT}) | extra
    r = http(server).post(path, json={"max_tokens": 4} | body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_the_official_client_gets_a_typed_error_for_an_unimplemented_field(client, model_name):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, model_name, max_tokens=4, extra_body={"prediction": {"type": "content", "content": "x"}})
    assert err.value.body["param"] == "prediction" and "not supported" in err.value.body["message"]


def test_inert_fields_are_accepted(client, model_name):
    r = chat(client, model_name, max_tokens=3, user="u-1", metadata={"team": "a"}, store=False)
    assert r.usage.completion_tokens >= 1


# ---- the fields at work, streamed and not ---------------------------------------------------------


def test_logit_bias_minus_100_forbids_the_greedy_token(client, model_name):
    first = chat(client, model_name, max_tokens=1, temperature=0, logprobs=True).choices[0].logprobs.content[0]
    token_id = int(http_tokenize(client, first.token))
    banned = chat(client, model_name, max_tokens=1, temperature=0, logit_bias={str(token_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first.token


def http_tokenize(client, token: str) -> int:
    """The id of a token the server returned (its text is one token of the vocabulary)."""
    r = client.post("/../tokenize", body={"prompt": token, "add_special_tokens": False}, cast_to=object)
    (token_id,) = r["tokens"]
    return token_id


SAME_BOTH_WAYS = {
    "penalties": {
        "temperature": 0.9,
        "seed": 3,
        "presence_penalty": 1.2,
        "frequency_penalty": 0.7,
        "extra_body": {"repetition_penalty": 1.3},
    },
    "min_p": {"temperature": 1.2, "seed": 4, "extra_body": {"min_p": 0.2, "top_k": 50}},
    "bias_and_bad_words": {"temperature": 0, "logit_bias": {"30": 5.0}, "extra_body": {"bad_words": ["the", "sea"]}},
    "min_tokens": {**SEEDED, "stop": ["e"], "extra_body": {"min_tokens": 6}},
    "n": {"temperature": 1.0, "seed": 5, "n": 2, "frequency_penalty": 1.0, "extra_body": {"min_p": 0.05}},
}


@pytest.mark.parametrize("case", sorted(SAME_BOTH_WAYS))
def test_stream_and_non_stream_give_the_same_answer(client, model_name, case):
    kw = json.loads(json.dumps(SAME_BOTH_WAYS[case])) | {"max_tokens": 12}
    assert streamed(client, model_name, **kw) == whole(client, model_name, **kw)


def test_min_tokens_holds_back_stop_strings(client, model_name):
    free = chat(client, model_name, max_tokens=12, **SEEDED).choices[0].message.content
    stop = next(ch for ch in free[1:] if ch.strip())  # a character the greedy text reaches early
    early = chat(client, model_name, max_tokens=12, **SEEDED, stop=[stop])
    late = chat(client, model_name, max_tokens=12, **SEEDED, stop=[stop], extra_body={"min_tokens": 10})
    assert early.usage.completion_tokens < 10 <= late.usage.completion_tokens


def test_include_stop_str_in_output(client, model_name):
    free = chat(client, model_name, max_tokens=12, **SEEDED).choices[0].message.content
    stop = free[3:5]
    cut = chat(client, model_name, max_tokens=12, **SEEDED, stop=[stop]).choices[0].message.content
    kept = (
        chat(client, model_name, max_tokens=12, **SEEDED, stop=[stop], extra_body={"include_stop_str_in_output": True})
        .choices[0]
        .message.content
    )
    assert kept == cut + stop and free.startswith(kept)


def test_bad_words_never_appear(client, model_name):
    free = chat(client, model_name, max_tokens=16, **SEEDED).choices[0].message.content
    word = max(free.split(), key=len)
    banned = (
        chat(client, model_name, max_tokens=16, **SEEDED, extra_body={"bad_words": [word]}).choices[0].message.content
    )
    assert word not in banned.split() and banned != free


def test_allowed_token_ids_and_skip_special_tokens(server, client, model_name):
    special = server.backend.tokenizer.convert_tokens_to_ids("<|im_start|>")
    body = {"max_tokens": 3, "temperature": 0, "allowed_token_ids": [special], "ignore_eos": True}
    skipped = chat(client, model_name, extra_body=body)
    shown = chat(client, model_name, extra_body=body | {"skip_special_tokens": False})
    assert skipped.choices[0].message.content == "" and skipped.usage.completion_tokens == 3
    assert shown.choices[0].message.content == "<|im_start|>" * 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, model_name):
    full = chat(client, model_name, max_tokens=2)
    cut = chat(client, model_name, max_tokens=2, extra_body={"truncate_prompt_tokens": 5})
    assert full.usage.prompt_tokens > 5 and cut.usage.prompt_tokens == 5
    r = client.completions.create(
        model=model_name,
        prompt="one two three four five six seven",
        max_tokens=2,
        extra_body={"truncate_prompt_tokens": 3},
    )
    assert r.usage.prompt_tokens == 3


def test_the_models_generation_config_supplies_defaults(tiny_model, tmp_path):
    """generation_config.json's temperature 0 makes a request that sets none greedy (vLLM's
    --generation-config auto); a request's own temperature still wins."""
    import shutil

    model = tmp_path / "greedy-by-default"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"temperature": 0.0, "top_k": 5}))
    live = serve(model, max_model_len=256, max_num_seqs=4, kv_cache_bytes=4 << 20)
    try:
        c = live.client()
        name = live.backend.model_name
        assert live.backend.sampling_defaults == {"temperature": 0.0, "top_k": 5}
        texts = {chat(c, name, max_tokens=10).choices[0].message.content for _ in range(3)}
        greedy = chat(c, name, max_tokens=10, temperature=0).choices[0].message.content
        assert texts == {greedy}
        sampled = {chat(c, name, max_tokens=10, temperature=1.5, seed=s).choices[0].message.content for s in range(3)}
        assert len(sampled) > 1
    finally:
        live.close()


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, model_name):
    chunks = list(
        chat(
            client,
            model_name,
            max_tokens=8,
            **SEEDED,
            stream=True,
            n=2,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks]  # the first (the role's) carries a token too
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts) and counts[0] >= 1
    final = chunks[-1].usage
    assert final.completion_tokens == 16 and counts[-2] == 16 and final.prompt_tokens == chunks[0].usage.prompt_tokens


# ---- chat templating -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt is still true
        (
            {"continue_final_message": True, "add_generation_prompt": False},
            "continue_final_message",
        ),  # a user message last
        ({"chat_template": "{{ messages[0]['content'] }}"}, "chat_template"),  # not trusted by this server
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ],
)
def test_chat_templating_mistakes_are_400s(server, extra, param):
    r = http(server).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2} | extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_request_chat_template_and_its_kwargs_on_a_trusting_server(tiny_model):
    live = serve(
        tiny_model, max_model_len=256, kv_cache_bytes=4 << 20, app_options={"trust_request_chat_template": True}
    )
    try:
        template = "{% for m in messages %}{{ greeting }}{{ m['content'] }}{% endfor %}"
        body = {
            "messages": [{"role": "user", "content": "x"}],
            "chat_template": template,
            "chat_template_kwargs": {"greeting": "Hello there! "},
        }
        rendered = http(live).post("/tokenize", json=body).json()
        assert rendered["tokens"] == live.backend.tokenizer.encode("Hello there! x", add_special_tokens=False)
        r = chat(
            live.client(),
            live.backend.model_name,
            max_tokens=2,
            **SEEDED,
            messages=body["messages"],
            extra_body={k: body[k] for k in ("chat_template", "chat_template_kwargs")},
        )
        assert r.usage.prompt_tokens == rendered["count"]
    finally:
        live.close()


def test_a_tokenizer_without_a_template_is_a_400_until_one_is_given(tiny_model, tmp_path):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    bare = serve(model, max_model_len=256, kv_cache_bytes=4 << 20)
    try:
        assert bare.backend.tokenizer.chat_template is None
        r = http(bare).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    finally:
        bare.close()
    given = serve(
        model, max_model_len=256, kv_cache_bytes=4 << 20, app_options={"chat_template": "{{ messages[0]['content'] }}"}
    )
    try:
        r = chat(given.client(), given.backend.model_name, max_tokens=2, **SEEDED)
        assert r.usage.prompt_tokens == len(
            given.backend.tokenizer.encode(CHAT[0]["content"], add_special_tokens=False)
        )
    finally:
        given.close()


def test_cli_refuses_a_missing_chat_template_file_before_loading_anything():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "serve", "--chat-template", "/no/such/template.jinja"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--chat-template '/no/such/template.jinja' is not a file" in proc.stderr


# ---- request ids and request metrics ---------------------------------------------------------------


def test_x_request_id_in_and_out(server, model_name):
    h = http(server)
    r = h.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "chatcmpl-trace-42"
    with h.stream(
        "POST",
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 2, "stream": True},
        headers={"X-Request-Id": "trace-43"},
    ) as s:
        first = json.loads(next(s.iter_lines()).removeprefix("data: "))
        assert s.headers["x-request-id"] == "trace-43" and first["id"] == "cmpl-trace-43"
    fresh = h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.json()["id"] == f"cmpl-{fresh.headers['x-request-id']}"
    bad = h.post("/v1/completions", json={"prompt": "Hi"}, headers={"X-Request-Id": "has space"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_a_duplicate_request_id_is_refused_and_the_first_request_still_finishes(server):
    """Two requests with one X-Request-Id at once: the second is a 400; refusing it must not
    abort the first, which still gets its whole answer."""
    import asyncio

    import httpx

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": "Bearer test-key", "X-Request-Id": "twin"}, timeout=60
        ) as h:
            first = asyncio.create_task(
                h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 200, "ignore_eos": True})
            )
            await asyncio.sleep(0.1)  # the first is running
            second = await h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            return [await first, second]

    first, second = asyncio.run(both())
    assert second.status_code == 400 and "already in use" in second.json()["error"]["message"]
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 200


def test_request_metrics_count_every_request_once(tiny_model):
    """On a fresh server: 4 requests (one with n = 2, a batch of 2 prompts, one streamed) give
    4 TTFTs, 4 end-to-end latencies, 4 of each phase, and token histograms summing to the totals."""
    live = serve(tiny_model, max_model_len=256, kv_cache_bytes=4 << 20)
    try:
        c, name = live.client(), live.backend.model_name
        chat(c, name, max_tokens=3, n=2, **SEEDED)
        c.completions.create(model=name, prompt=["Hi", "Hello there"], max_tokens=4, **SEEDED)
        list(chat(c, name, max_tokens=2, stream=True, **SEEDED))
        values = {}
        for line in http(live).get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        label = f'{{model_name="{name}"}}'
        for histogram in (
            "time_to_first_token_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
            "request_prefill_time_seconds",
            "request_decode_time_seconds",
            "request_inference_time_seconds",
            "request_prompt_tokens",
            "request_generation_tokens",
        ):
            assert values[f"vllm:{histogram}_count{label}"] == 4, histogram
        assert values[f"vllm:request_prompt_tokens_sum{label}"] == values[f"vllm:prompt_tokens_total{label}"]
        assert (
            values[f"vllm:request_generation_tokens_sum{label}"]
            == values[f"vllm:generation_tokens_total{label}"]
            == 6 + 8 + 2
        )
        phases = sum(values[f"vllm:request_{p}_time_seconds_sum{label}"] for p in ("queue", "prefill", "decode"))
        inference = (
            values[f"vllm:request_inference_time_seconds_sum{label}"]
            + values[f"vllm:request_queue_time_seconds_sum{label}"]
        )
        assert phases == pytest.approx(inference) and phases <= values[f"vllm:e2e_request_latency_seconds_sum{label}"]
    finally:
        live.close()
