"""Admission by tokens as well as requests, the Retry-After estimate, and the queue deadline
(serve/async_engine.py), on the tiny random Llama of test_serve_api."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest

from serve.async_engine import AsyncEngine, Overloaded, retry_after
from serve.config import EngineConfig
from serve.engine.llm_engine import LLMEngine
from serve.engine.sampling_params import SamplingParams
from test_serve_api import LiveServer, smollm2, tiny_model  # noqa: F401  (fixtures)


def engine_for(model, **config) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=str(model), dtype="float32", max_model_len=256, kv_cache_bytes=8 << 20, **config)
    )


def test_retry_after_divides_the_queued_tokens_by_the_measured_prefill_rate():
    assert retry_after(5000, 1000.0) == 5 and retry_after(5001, 1000.0) == 6
    assert retry_after(10, 0.0) == 1  # nothing measured yet
    assert retry_after(10, 1e6) == 1 and retry_after(10**9, 1.0) == 3600  # clamped to 1 s .. 1 h


def test_queued_prompt_tokens_are_bounded_and_one_long_prompt_still_gets_in(tiny_model):
    """The step loop is not running, so what is submitted stays queued."""
    backend = AsyncEngine(engine_for(tiny_model), thread=False, max_queued_tokens=100)
    backend._stats = dataclasses.replace(backend._stats, prefill_tokens_per_s=20.0)  # as if measured
    params = SamplingParams(max_tokens=4)

    async def scenario() -> None:
        first = backend.generate("long", [5] * 150, params)  # longer than the limit: alone, it is admitted
        waiter = asyncio.ensure_future(anext(first))
        await asyncio.sleep(0.05)  # iterated: now in the inbox
        with pytest.raises(
            Overloaded,
            match=r"150 prompt tokens are already waiting and this request brings 30 .*--max-num-queued-tokens 100",
        ) as err:
            backend.generate("next", [5] * 30, params)
        assert err.value.retry_after == 9  # (150 + 30) tokens at 20 tokens/s
        waiter.cancel()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="max_queued_tokens must be > 0"):
        AsyncEngine(backend.engine, thread=False, max_queued_tokens=0)


def test_the_engine_measures_its_prefill_rate(tiny_model):
    engine = engine_for(tiny_model)
    assert engine.stats().prefill_tokens_per_s == 0.0
    engine.generate([[5] * 100], SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.stats().prefill_tokens_per_s > 0 and engine.stats().num_waiting_tokens == 0


def test_a_request_waiting_past_the_deadline_gets_503_streamed_or_not(tiny_model):
    """One sequence at a time, the first one slowed down: the next waits unscheduled past
    max_queue_time and is dropped, with 503 + Retry-After (non-streaming) or the same error
    in-band (streaming, whose headers went out first); the running one is unaffected."""
    engine = engine_for(tiny_model, max_num_seqs=1)
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    live = LiveServer(AsyncEngine(engine, max_queue_time=0.3))
    try:
        http = httpx.Client(base_url=live.url, timeout=60)
        body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first one is running
            late = http.post("/v1/completions", json={**body, "max_tokens": 2})
            assert late.status_code == 503 and late.json()["error"]["code"] == "queue_timeout"
            assert (
                "(--max-queue-time 0.3 s)" in late.json()["error"]["message"] and int(late.headers["retry-after"]) >= 1
            )
            with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 2, "stream": True}) as streamed:
                events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
            assert streamed.status_code == 200 and events[-1]["error"]["code"] == "queue_timeout"
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        live.close()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-queue-time", "0"], "--max-queue-time must be > 0, got 0"),
        (["--kv-cache-gb", "-1"], "--kv-cache-gb must be > 0, got -1"),
        (["--kv-cache-fraction", "2"], "--kv-cache-fraction must be in (0, 1], got 2"),
        (
            ["--engine", "vllm", "--kv-cache-dtype", "int8"],
            "--kv-cache-dtype is ministack's engine's; --engine vllm does not take it",
        ),
        (["--rope-scaling", "[2.0]"], "argument --rope-scaling: not a JSON object: '[2.0]'"),
        (["--rope-scaling", "yarn"], "argument --rope-scaling: not JSON (Expecting value at character 0): 'yarn'"),
        (["--speculative-config", "ngram"], "argument --speculative-config: not JSON"),
        (
            [
                "--kv-cache-gb",
                "0.02",
                "--max-model-len",
                "8192",
                "--embedding-model",
                "none",
            ],  # refused once the model is read
            "max_model_len 8192 does not fit the KV cache",
        ),
    ],
)
def test_the_cli_refuses_impossible_limits_in_one_line_naming_the_flag(flags, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "serve", *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_priority_is_refused_under_fcfs_and_honoured_under_the_priority_policy(tiny_model):
    """Under the default first-come-first-served policy a non-zero `priority` is a 400 naming the
    field and the flag that enables it (never silently ignored); under `--scheduling-policy
    priority` the same request is served (the order itself: tests/test_serve_engine_scheduler.py)."""
    body = {"prompt": "Hi", "max_tokens": 2, "priority": -3}
    for policy, status in (("fcfs", 400), ("priority", 200)):
        live = LiveServer(AsyncEngine(engine_for(tiny_model, scheduling_policy=policy)))
        try:
            r = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == status, r.text
            if status == 400:
                assert (
                    r.json()["error"]["param"] == "priority"
                    and "--scheduling-policy priority" in r.json()["error"]["message"]
                )
        finally:
            live.close()
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo").validate()


def test_rope_scaling_reaches_the_engine_config():
    from serve.cli import engine_config, parser

    args = parser().parse_args(["--rope-scaling", '{"rope_type": "yarn", "factor": 2.0}', "--kv-cache-dtype", "int8"])
    config = engine_config(args)
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 2.0} and config.kv_cache_dtype == "int8"
