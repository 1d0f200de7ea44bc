"""The unhappy paths of the server, each a regression test for a failure seen against a live
`ministack serve`: sampling values that once killed the engine, refused requests that stayed
queued, a queue cap that could be overrun, and inputs that stalled every endpoint."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from serve.async_engine import AsyncEngine, Overloaded
from serve.config import EngineConfig
from serve.engine.llm_engine import LLMEngine
from serve.engine.sampling_params import SEED_RANGE, SamplingParams
from test_serve_api import http, serve, smollm2, tiny_model, wait_until  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def live(tiny_model):
    server = serve(tiny_model, max_model_len=256, max_num_seqs=8, kv_cache_bytes=8 << 20)
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine(tiny_model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", max_model_len=256, kv_cache_bytes=8 << 20))


def idle(live) -> bool:
    s = live.backend.stats()
    return s.num_running == s.num_waiting == 0 and s.kv_usage == 0


# ---- sampling: every accepted value gives a valid distribution -------------------------------

TINY = [5e-324, 1e-300, 1e-45, 1e-38, 1e-6]
EXTREMES = {
    "temperature": st.sampled_from([0.0, *TINY, 1e-5, 1.0, 2.0]) | st.floats(0, 2),
    "top_p": st.sampled_from([*TINY, 0.5, 1.0]) | st.floats(1e-300, 1),
    "top_k": st.sampled_from([-1, 0, 1, 2, 10**9]),
    "min_p": st.sampled_from([0.0, *TINY, 0.999999, 1.0]) | st.floats(0, 1),
    "repetition_penalty": st.sampled_from([1e-255, *TINY, 1.0, 1e30, 1e300, math.inf]),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "logit_bias": st.sampled_from([{}, {0: 100.0}, {0: -100.0, 1: 100.0}]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(**EXTREMES)
def test_extreme_sampling_values_yield_tokens_and_the_engine_goes_on(engine, **fields):
    params = SamplingParams(max_tokens=3, seed=7, ignore_eos=True, **fields)
    try:
        params.validate(engine.model.lm_head.out_features)
    except ValueError:
        return  # refused with a reason naming the field (the API answers 400): nothing reaches the engine
    prompt = [17, 17, 17, 42, 42, 42]  # repeated tokens: the repetition penalty touches them
    (out,) = engine.generate([prompt], params)
    assert out.error is None and len(out.outputs[0].token_ids) == 3
    assert all(0 <= t < engine.model.lm_head.out_features for t in out.outputs[0].token_ids)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 1e-300},
        {"top_p": 1e-300},
        {"repetition_penalty": 1e-255},
        {"min_p": 1.0, "temperature": 1e-300},
    ],
)
def test_sampling_values_that_killed_the_engine_now_answer(live, body):
    prompt = "the the the the the the"
    r = http(live).post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_a_request_with_no_token_left_fails_alone(live, engine):
    """EOS is the only allowed token and min_tokens bans it: nothing can be sampled. That
    request gets a 400 naming why (its own settings cannot be served); one beside it in the
    same batch finishes; the engine lives."""
    eos = min(engine.eos_token_ids)
    banned = {"prompt": "Hi", "max_tokens": 4, "allowed_token_ids": [eos], "min_tokens": 2}
    h = http(live)
    with h.stream(
        "POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 40, "ignore_eos": True, "stream": True}
    ) as other:
        failed = h.post("/v1/completions", json=banned)
        text = "".join(line for line in other.iter_lines())
    assert failed.status_code == 400 and failed.json()["error"]["type"] == "invalid_request_error"
    assert "no token can be sampled" in failed.json()["error"]["message"]
    assert '"finish_reason":"length"' in text
    streamed = [
        json.loads(line[6:])
        for line in h.post("/v1/completions", json={**banned, "stream": True}).text.splitlines()
        if line.startswith("data: {")
    ]
    assert streamed[-1]["error"]["type"] == "invalid_request_error"  # in-band once the stream has started
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert wait_until(lambda: idle(live))


# ---- refused requests leave nothing behind; the queue cap is hard ----------------------------


def test_the_largest_seed_with_n_above_one_runs_and_a_seed_past_64_bits_is_refused(live):
    h = http(live)
    ok = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "n": 2, "seed": SEED_RANGE[1]})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    for seed in (SEED_RANGE[1] + 1, SEED_RANGE[0] - 1):
        r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "n": 2, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert wait_until(lambda: idle(live))


def test_an_engine_refusal_half_way_through_a_request_queues_none_of_it(engine, monkeypatch):
    """The second of n=3 sequences cannot be built: none of the three is left in the scheduler."""
    import serve.engine.llm_engine as module

    queued = len(engine.scheduler.waiting) + len(engine.scheduler.running)
    built, real = [], module.Detokenizer

    def second_fails(*args, **kwargs):
        built.append(1)
        if len(built) == 2:
            raise RuntimeError("the second sequence cannot be built")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "Detokenizer", second_fails)
    with pytest.raises(RuntimeError):
        engine.add_request("half", [1, 2, 3], SamplingParams(max_tokens=2, n=3, seed=1))
    assert "half" not in engine.requests
    assert len(engine.scheduler.waiting) + len(engine.scheduler.running) == queued


def test_max_queue_is_a_hard_cap_however_many_arrive_at_once(engine):
    """Submissions in one burst, before the step loop has run once: exactly max_queue are taken."""
    backend = AsyncEngine(engine, max_queue=3, thread=False)

    async def burst() -> tuple[int, int]:
        taken, refused = [], 0
        for i in range(10):
            try:
                taken.append(backend.generate(f"burst-{i}", [1, 2, 3], SamplingParams(max_tokens=1)))
            except Overloaded:
                refused += 1
        for stream in taken:
            await stream.aclose()
        return len(taken), refused

    assert asyncio.run(burst()) == (3, 7)


# ---- limits decided before expensive work ----------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_read(live):
    h = http(live)
    r = h.post(
        "/v1/completions",
        content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

    def chunks():
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"a" * (1 << 20)
        yield b'"}'

    chunked = h.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_a_prompt_too_long_to_fit_is_refused_without_tokenizing_it(live, monkeypatch):
    tokenizer = live.backend.tokenizer
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a prompt that cannot fit"))
    r = http(live).post("/v1/completions", json={"prompt": "word " * 200_000, "max_tokens": 1})
    assert (
        r.status_code == 400
        and r.json()["error"]["param"] == "prompt"
        and "characters cannot fit" in r.json()["error"]["message"]
    )
    chat = http(live).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 1_000_000}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    "field, body, says",
    [
        ("logit_bias", {"logit_bias": {"²": 1}}, "token ids"),
        ("logit_bias", {"logit_bias": {str(i): 1 for i in range(2000)}}, "1024"),
        ("stop", {"stop": ["x" * 300]}, "256 characters"),
        ("bad_words", {"bad_words": ["w"] * 2000}, "1024"),
        (
            "response_format",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "e",
                        "schema": {"type": "object", "properties": {"a": {"enum": list(range(2000))}}},
                    },
                }
            },
            "enum/const/choice values",
        ),
        (
            "response_format",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "e",
                        "schema": {"type": "object", "properties": {"a": {"enum": [f"v{i}" for i in range(100_000)]}}},
                    },
                }
            },
            "characters",
        ),
        (
            "response_format",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "p",
                        "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "a{1,10000}"}}},
                    },
                }
            },
            "repetition",
        ),
        ("guided_regex", {"guided_regex": "(ab){1,5000}"}, "repetition"),
        ("guided_choice", {"guided_choice": [f"c{i}" for i in range(2000)]}, "choice values"),
    ],
)
def test_each_size_limit_is_a_400_naming_its_field(live, field, body, says):
    started = time.perf_counter()
    r = http(live).post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"].startswith(field) and says in error["message"], r.text
    assert time.perf_counter() - started < 10  # refused, not compiled (a 100,000-value enum took minutes)


def test_grammar_compilation_does_not_stall_other_endpoints(live, monkeypatch):
    slow = threading.Event()
    compile_structured = live.backend.check_structured

    def slow_compile(structured):
        slow.set()
        time.sleep(2)
        return compile_structured(structured)

    monkeypatch.setattr(live.backend, "check_structured", slow_compile)
    result = {}
    body = {"prompt": "hi", "max_tokens": 8, "temperature": 0, "guided_choice": ["yes", "no"]}
    worker = threading.Thread(target=lambda: result.update(r=http(live).post("/v1/completions", json=body)))
    worker.start()
    assert slow.wait(10)
    started = time.perf_counter()
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert time.perf_counter() - started < 1.0  # answered while the compile ran
    worker.join()
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] in ("yes", "no")


# ---- security: what the API key guards, where it comes from, docs without a CDN ---------------


def test_the_key_guards_every_route_but_health(live):
    from test_serve_api import API_KEY

    for path in ("/metrics", "/openapi.json", "/docs", "/docs/swagger-ui-bundle.js", "/v1/models"):
        assert httpx.get(f"{live.url}{path}").status_code == 401, path
        assert httpx.get(f"{live.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert httpx.get(f"{live.url}/health").status_code == 200
    guarded = {"Authorization": f"Bearer {API_KEY}"}
    page = httpx.get(f"{live.url}/docs", headers=guarded).text
    assert "/docs/swagger-ui-bundle.js" in page and "/docs/swagger-ui.css" in page
    assert "http://" not in page and "https://" not in page  # nothing from a third party
    script = httpx.get(f"{live.url}/docs/swagger-ui-bundle.js", headers=guarded)
    assert script.status_code == 200 and len(script.content) > 100_000
    assert "/v1/chat/completions" in httpx.get(f"{live.url}/openapi.json", headers=guarded).json()["paths"]


def test_public_metrics_opens_metrics_only(tiny_model):
    open_metrics = serve(tiny_model, max_model_len=128, kv_cache_bytes=1 << 20, app_options={"public_metrics": True})
    try:
        assert httpx.get(f"{open_metrics.url}/metrics").status_code == 200
        assert httpx.get(f"{open_metrics.url}/v1/models").status_code == 401
    finally:
        open_metrics.close()


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from serve.api.auth import ENV_VAR, resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    monkeypatch.setenv(ENV_VAR, "sk-from-env")
    assert resolve_api_key(None, str(key_file)) == "sk-from-file"
    assert resolve_api_key(None, None) == "sk-from-env"
    assert resolve_api_key("sk-flag", None) == "sk-flag" and "visible to every local user" in capsys.readouterr().out
    monkeypatch.setenv(ENV_VAR, " ")
    with pytest.raises(SystemExit, match="set but empty"):  # an empty key must not mean "open"
        resolve_api_key(None, None)
    monkeypatch.delenv(ENV_VAR)
    assert resolve_api_key(None, None) is None
    (tmp_path / "empty").write_text("\n")
    for flag, path, says in (
        ("k", str(key_file), "one of"),
        (None, str(tmp_path / "empty"), "holds no key"),
        (None, str(tmp_path / "missing"), "--api-key-file"),
    ):
        with pytest.raises(SystemExit, match=says):
            resolve_api_key(flag, path)


# ---- shutdown: a grace period, then a clean error; a second signal forces ---------------------


def start_cli(model, *flags: str):
    """`ministack serve` in a subprocess on a free port, once it answers /health."""
    import socket
    import subprocess
    import sys

    from test_serve_api import _answers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--kv-cache-gb",
            "0.01",
            "--embedding-model",
            "none",
            "--log-level",
            "warning",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _answers(f"{url}/health"), timeout=180), "server did not start"
    return proc, url


def streamed_events(url: str, signals: list[int], proc) -> list[dict]:
    """A long stream's events, the `signals` sent to `proc` once its first token came."""
    body = {"prompt": "Once", "max_tokens": 500, "stream": True, "ignore_eos": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    for sig in signals:
                        proc.send_signal(sig)
                        time.sleep(0.3)
    return events


@pytest.mark.slow
def test_sigterm_ends_what_outlives_the_grace_period_with_a_clean_error(tiny_model):
    import signal

    proc, url = start_cli(tiny_model, "--shutdown-timeout", "0")
    try:
        events = streamed_events(url, [signal.SIGTERM], proc)
        assert events[-1]["error"]["code"] == "engine_unavailable" and "shutting down" in events[-1]["error"]["message"]
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read()
        assert "Traceback" not in output and "shutting down" in output
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_second_signal_forces_the_exit(tiny_model):
    import signal

    proc, url = start_cli(tiny_model, "--shutdown-timeout", "600")
    try:
        started = time.monotonic()
        events = streamed_events(url, [signal.SIGTERM, signal.SIGINT], proc)
        assert "second signal" in events[-1]["error"]["message"]  # told, not cut off
        assert proc.wait(timeout=30) == 1 and time.monotonic() - started < 30  # not the 600 s of grace
        assert "Traceback" not in proc.stdout.read()
    finally:
        proc.kill()


def test_an_embedding_batch_is_capped(live):
    r = http(live).post("/v1/embeddings", json={"input": ["a"] * 2049})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input" and "2048" in r.json()["error"]["message"]


def test_the_step_loop_gives_freed_heap_back_once_idle(engine, monkeypatch):
    """glibc keeps freed heap pages: the loop trims them when idle after serving, not while busy."""
    import serve.async_engine as module

    monkeypatch.setattr(module, "TRIM_INTERVAL_S", 0.05)
    backend = AsyncEngine(engine, max_queue=8)
    trims, busy = [], []
    backend._trim = lambda pad: trims.append(pad) or busy.append(engine.has_unfinished_requests()) or 1

    async def one() -> None:
        async for _ in backend.generate("trim-1", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True)):
            pass

    try:
        time.sleep(0.2)
        assert trims == []  # nothing served, nothing to give back
        asyncio.run(one())
        assert wait_until(lambda: len(trims) == 1) and busy == [False]
        time.sleep(0.2)
        assert len(trims) == 1  # once per idle spell, not in a loop
    finally:
        backend.close()


def test_a_kernel_build_lock_left_by_a_killed_build_is_cleared_and_a_live_one_awaited(tmp_path, capsys):
    import os

    from serve.kernels import STALE_BUILD_S, _await_other_build

    stale = tmp_path / "lock"
    stale.touch()
    os.utime(stale, (time.time() - STALE_BUILD_S - 1,) * 2)
    _await_other_build(stale)  # a build killed long ago: every later load would have waited forever
    assert not stale.exists()
    live = tmp_path / "live-lock"
    live.touch()
    threading.Timer(1.5, live.unlink).start()  # the other build finishes
    started = time.monotonic()
    _await_other_build(live)
    assert time.monotonic() - started >= 1.0 and "waiting for another process" in capsys.readouterr().out


def test_a_bad_key_setting_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    import serve.cli as cli
    from serve.api.auth import access_line

    monkeypatch.setattr(cli, "build_backend", lambda args: pytest.fail("loaded the model before checking the key"))
    with pytest.raises(SystemExit, match="--api-key-file"):
        cli.main(["--api-key-file", str(tmp_path / "missing"), "--embedding-model", "none"])
    assert access_line(None, "0.0.0.0", False).startswith("WARNING: no API key")
    assert access_line(None, "127.0.0.1", False) == "no API key (local connections only)"
    assert "every route but /health and /metrics" in access_line("k", "0.0.0.0", True)
