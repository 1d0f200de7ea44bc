"""`--engine vllm`: vLLM's engine behind ministack's server, same wire format, metrics and FLOPs.

Runs only where vLLM is installed (its CPU build works: see docs/serving.md); start-up takes
~2 minutes, so everything shares one server.
"""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from test_serve_api import LiveServer, wait_until  # noqa: E402

from profiling.formulas.llama import DecoderShape, decoder_flops  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from serve.backends.vllm import VllmBackend

    ledger = tmp_path_factory.mktemp("vllm") / "ledger.jsonl"
    backend = VllmBackend(
        model=None,
        dtype="float32",
        max_model_len=1024,
        kv_cache_bytes=256 << 20,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        ledger=str(ledger),
    )
    live = LiveServer(backend)
    live.ledger = ledger
    yield live
    live.server.should_exit = True
    live.thread.join(timeout=10)
    backend.engine.shutdown()


def test_vllm_backend_answers_and_charges_the_exact_formula(server):
    client = server.client()
    r = client.chat.completions.create(
        model=server.backend.model_name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    u = r.usage
    shape: DecoderShape = server.backend.shape
    expected = sum(decoder_flops(shape, q_len=u.prompt_tokens, past_len=0, logits=1).values()) + sum(
        sum(decoder_flops(shape, q_len=1, past_len=u.prompt_tokens + i, logits=1).values())
        for i in range(u.completion_tokens - 1)
    )
    assert u.model_extra["flops"]["measured"] == expected
    record = json.loads(server.ledger.read_text().splitlines()[-1])
    assert record["kind"] == "infer" and record["measured_flops"] == expected
    assert record["tokens"] == u.total_tokens


def test_vllm_backend_streams_with_usage_and_logprobs(server):
    client = server.client()
    chunks = list(
        client.completions.create(
            model=server.backend.model_name,
            prompt="The sky is",
            max_tokens=6,
            temperature=0,
            logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in text_chunks) == 6
    assert chunks[-1].usage.completion_tokens == 6


def test_vllm_backend_disconnect_aborts_and_metrics_show_it(server):
    h = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer test-key"}, timeout=60)
    with h.stream(
        "POST",
        "/v1/completions",
        json={"prompt": "Tell me a story", "max_tokens": 500, "stream": True, "ignore_eos": True},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert wait_until(lambda: server.backend.stats().num_running == 0, timeout=20)
    text = h.get("/metrics").text
    assert "vllm:num_requests_running" in text and "vllm:time_to_first_token_seconds_count" in text


def test_vllm_backend_echo_with_logprobs_scores_the_prompt(server):
    client = server.client()
    tokenizer = server.backend.tokenizer
    prompt_ids = tokenizer.encode("The sky is")
    choice = client.completions.create(
        model=server.backend.model_name,
        prompt="The sky is",
        max_tokens=3,
        temperature=0,
        logprobs=1,
        echo=True,
        extra_body={"ignore_eos": True},
    ).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("The sky is") and len(lp.tokens) == len(prompt_ids) + 3
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])


def test_vllm_backend_passes_the_sampling_fields_on(server):
    """The newer sampling fields reach vLLM's SamplingParams under vLLM's names: a -100 bias
    removes the greedy token, min_tokens holds EOS back, bad_words bans a word; a structured
    output is refused (this backend does not pass it on)."""
    import openai

    client, name = server.client(), server.backend.model_name
    messages = [{"role": "user", "content": "What is the capital of France? One word."}]
    first = client.chat.completions.create(model=name, messages=messages, max_tokens=1, temperature=0, logprobs=True)
    token = first.choices[0].logprobs.content[0]
    token_id = server.backend.tokenizer.encode(token.token, add_special_tokens=False)[0]
    biased = client.chat.completions.create(
        model=name, messages=messages, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(token_id): -100}
    )
    assert biased.choices[0].logprobs.content[0].token != token.token
    short = client.chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0)
    longer = client.chat.completions.create(
        model=name,
        messages=messages,
        max_tokens=40,
        temperature=0,
        extra_body={"min_tokens": short.usage.completion_tokens + 5},
    )
    assert longer.usage.completion_tokens >= short.usage.completion_tokens + 5
    word = short.choices[0].message.content.split()[0].strip(".,")
    banned = client.chat.completions.create(
        model=name, messages=messages, max_tokens=20, temperature=0, extra_body={"bad_words": [word]}
    )
    assert word not in banned.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="not passed on to vLLM"):
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=4, response_format={"type": "json_object"}
        )
