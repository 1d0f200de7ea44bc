"""`ministack serve` (= `python -m serve`): start the OpenAI-compatible server.

    ministack serve [--model DIR|FILE.gguf|smollm2] [--port 8000] [--engine ministack|vllm] ...
    ministack serve needle ...   # the needle-in-a-haystack harness against a running server
    ministack serve ruler ...    # the RULER-style harness (multi-key / multi-value needles, variable tracking, common words)

Binds 127.0.0.1 unless told otherwise: an inference server with no API key should not be
reachable from the network by accident (serve.api.auth: where the key comes from, what it guards).

Shutdown: the first SIGTERM / SIGINT stops accepting connections and lets the requests in flight
finish for up to --shutdown-timeout seconds; those still running then end with a clean error
(503 / an in-band error event) and the process exits 0. A second signal ends them at once and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import Field
from typing import Any, get_args, get_type_hints

from serve.api.limits import DEFAULT_MAX_REQUEST_BYTES


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags (model, device, dtype, KV budget, batching), shared by every command
    that starts an LLMEngine; `engine_config` turns them into an EngineConfig. Most are
    EngineConfig's own fields (serve.config.flag: name, default and help stated there); the
    rest set a field in other units or several at once."""
    from serve.config import EngineConfig, flag_fields

    kv_budget = p.add_mutually_exclusive_group()
    kv_budget.add_argument("--kv-cache-gb", type=float, default=None, help="KV-cache budget in GiB")
    for f in flag_fields():
        name, options = field_flag(f)
        (kv_budget if f.name == "kv_cache_fraction" else p).add_argument(name, **options)
    p.add_argument(
        "--half-weights",
        choices=("auto", "on", "off"),
        default="auto",
        help="CPU, float32: store linear weights in float16 (float32 math); auto: on with --dtype auto",
    )
    p.add_argument(
        "--kv-cache-disk-gb",
        type=float,
        default=EngineConfig.kv_cache_disk_bytes / 2**30,
        help="the disk tier's size cap (least recently used files go first)",
    )
    p.add_argument(
        "--speculative-config",
        type=speculative_json,
        default=None,
        help='n-gram speculative decoding (vLLM\'s flag): {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}; greedy requests only',
    )


def field_flag(f: Field) -> tuple[str, dict[str, Any]]:
    """--field-name and its add_argument options: the field's type (its annotation without None;
    a dict is a JSON object), default, help, choices and metavar."""
    from serve.config import EngineConfig

    hint = get_type_hints(EngineConfig)[f.name]
    (kind,) = [t for t in get_args(hint) or (hint,) if t is not type(None)]
    if kind not in FLAG_TYPES:
        raise TypeError(f"EngineConfig.{f.name}: a {kind.__name__} field has no flag type; write its flag by hand")
    return "--" + f.name.replace("_", "-"), {"type": FLAG_TYPES[kind], "default": f.default, **f.metadata["flag"]}


def json_object(text: str) -> dict:
    """A flag's JSON-object value (--rope-scaling, --speculative-config); what is not one is
    refused with the reason (argparse names the flag)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


FLAG_TYPES = {int: int, float: float, str: str, dict: json_object}  # an EngineConfig field's type -> its flag's

NGRAM_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}


def speculative_json(text: str) -> dict:
    """--speculative-config's value: vLLM's JSON for the ngram method; anything else is refused
    by name (argparse names the flag)."""
    value = json_object(text)
    if value.get("method") != "ngram":
        raise argparse.ArgumentTypeError(f'method {value.get("method")!r}: only "ngram" (prompt lookup) is implemented')
    if unknown := set(value) - NGRAM_KEYS:
        raise argparse.ArgumentTypeError(f"unsupported keys {sorted(unknown)}; known: {sorted(NGRAM_KEYS)}")
    if not isinstance(value.get("num_speculative_tokens"), int) or value["num_speculative_tokens"] < 1:
        raise argparse.ArgumentTypeError("num_speculative_tokens must be an integer >= 1")
    return value


def engine_config(args: argparse.Namespace, **overrides: object):
    """The EngineConfig the engine flags ask for (`overrides` win)."""
    from serve.config import EngineConfig, flag_fields

    settings = {f.name: getattr(args, f.name) for f in flag_fields()} | dict(
        kv_cache_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30),
        half_weights={"auto": None, "on": True, "off": False}[args.half_weights],
        kv_cache_disk_bytes=int(args.kv_cache_disk_gb * 2**30),
        **{k: v for k, v in (args.speculative_config or {}).items() if k != "method"},
    )
    return EngineConfig(**(settings | overrides))


def check_limits(args: argparse.Namespace) -> None:
    """Refuse a limit that cannot be right before anything is loaded, naming its flag."""
    positive = {
        "--kv-cache-gb": args.kv_cache_gb,
        "--kv-cache-disk-gb": args.kv_cache_disk_gb,
        "--max-queue": args.max_queue,
        "--max-num-queued-tokens": args.max_num_queued_tokens,
        "--max-queue-time": args.max_queue_time,
        "--max-num-seqs": args.max_num_seqs,
        "--max-num-batched-tokens": args.max_num_batched_tokens,
        "--max-model-len": args.max_model_len,
        "--max-request-bytes": args.max_request_bytes,
    }
    for flag, value in positive.items():
        if value is not None and value <= 0:
            raise SystemExit(f"ministack serve: {flag} must be > 0, got {value:g}")
    if args.kv_cache_fraction is not None and not 0 < args.kv_cache_fraction <= 1:
        raise SystemExit(f"ministack serve: --kv-cache-fraction must be in (0, 1], got {args.kv_cache_fraction:g}")
    if args.shutdown_timeout < 0:
        raise SystemExit(f"ministack serve: --shutdown-timeout must be >= 0, got {args.shutdown_timeout:g}")
    if args.json_max_digits < 2:
        raise SystemExit(f"ministack serve: --json-max-digits must be >= 2, got {args.json_max_digits}")


def minor_version(text: str) -> tuple[int, int]:
    """A vLLM version as (major, minor): '0.10' or '0.10.2'; anything else is refused (argparse
    names the flag), never read as "show nothing"."""
    parts = text.split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"not a version such as 0.10: {text!r}")
    return int(parts[0]), int(parts[1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ministack serve", description="OpenAI-compatible text inference server")
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (visible in ps: prefer "
        "--api-key-file or $MINISTACK_API_KEY)",
    )
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from this file")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument(
        "--show-hidden-metrics-for-version",
        type=minor_version,
        default=None,
        metavar="VERSION",
        help="vLLM's flag: also serve the metric names vLLM retired after VERSION (e.g. 0.10: "
        "vllm:gpu_cache_usage_perc, vllm:time_per_output_token_seconds), while dashboards migrate",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413 before they are read",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may run before they are ended with an error",
    )
    p.add_argument("--engine", choices=("ministack", "vllm"), default="ministack")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which new ones get 429")
    p.add_argument(
        "--max-num-queued-tokens",
        type=int,
        default=None,
        help="waiting prompt tokens beyond which new requests get 429 (default: no limit)",
    )
    p.add_argument(
        "--max-queue-time",
        type=float,
        default=None,
        help="seconds a request may wait unscheduled before it is dropped with 503 (default: no limit)",
    )
    p.add_argument("--ledger", default=None, help="append one compute record per request to this JSONL file")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file replacing the tokenizer's")
    p.add_argument(
        "--embedding-model",
        default="minilm",
        help="/v1/embeddings: 'minilm' (the shipped all-MiniLM-L6-v2), a local encoder directory, or 'none'",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="run the chat_template a request sends (refused by default)",
    )
    p.add_argument("--log-level", default="info")
    return p


def build_backend(args: argparse.Namespace):
    """The backend the flags ask for (vLLM is imported only when chosen)."""
    kv_bytes = None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30)
    if args.engine == "vllm":
        for flag, value in (
            ("--kv-cache-dtype", args.kv_cache_dtype != "auto"),
            ("--kv-cache-disk", args.kv_cache_disk),
            ("--rope-scaling", args.rope_scaling),
            ("--json-max-digits", args.json_max_digits != parser().get_default("json_max_digits")),
            ("--max-itl-ms", args.max_itl_ms),
            ("--long-prefill-token-threshold", args.long_prefill_token_threshold),
            ("--max-num-partial-prefills", args.max_num_partial_prefills != 1),
            ("--max-num-queued-tokens", args.max_num_queued_tokens),
            ("--max-queue-time", args.max_queue_time),
        ):
            if value:
                raise SystemExit(f"ministack serve: {flag} is ministack's engine's; --engine vllm does not take it")
        from serve.backends.vllm import VllmBackend

        return VllmBackend(
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            kv_cache_bytes=kv_bytes,
            kv_cache_fraction=args.kv_cache_fraction,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_queue=args.max_queue,
            ledger=args.ledger,
            tensor_parallel_size=args.tensor_parallel_size,
            scheduling_policy=args.scheduling_policy,
            speculative_config=args.speculative_config,
        )
    if args.tensor_parallel_size != 1:
        raise SystemExit("ministack serve: --tensor-parallel-size needs --engine vllm")
    from serve.async_engine import AsyncEngine
    from serve.engine.llm_engine import LLMEngine

    try:  # a setting the engine refuses (the KV cache too small for --max-model-len, ...): one line, naming it
        engine = LLMEngine(engine_config(args, ledger=args.ledger))
    except ValueError as exc:
        raise SystemExit(f"ministack serve: {exc}") from None
    # no thread: serve_http runs the step loop on this (the main) thread, see serve.async_engine
    return AsyncEngine(
        engine,
        max_queue=args.max_queue,
        thread=False,
        max_queued_tokens=args.max_num_queued_tokens,
        max_queue_time=args.max_queue_time,
    )


FORCE_AFTER_S = 2.0  # after a second signal: how long the connections get to carry their errors out


class Shutdown:
    """The signal handler of a server whose step loop runs on the main thread (module docstring):
    the first signal drains for `grace` seconds, then fails what is left; a second forces."""

    def __init__(self, server, backend, grace: float) -> None:
        self.server, self.backend, self.grace = server, backend, grace
        self.signals, self.timer = 0, None

    def __call__(self, signum, frame) -> None:
        import threading

        self.signals += 1
        self.server.should_exit = True  # uvicorn stops accepting, then waits for the connections in flight
        if self.signals == 1:
            print(
                f"ministack serve: shutting down; requests in flight have {self.grace:g} s (--shutdown-timeout), "
                "a second signal ends them now",
                flush=True,
            )
            self.timer = threading.Timer(
                self.grace,
                self.backend.fail_all,
                [f"the server is shutting down (--shutdown-timeout {self.grace:g} s ran out)"],
            )
            self.timer.daemon = True
            self.timer.start()
            return
        # end every request now: their handlers answer at once and uvicorn's wait for the
        # connections ends cleanly; a connection that still hangs on is dropped shortly after
        self.backend.fail_all("the server was stopped (a second signal)")
        force = threading.Timer(FORCE_AFTER_S, setattr, [self.server, "force_exit", True])
        force.daemon = True
        force.start()

    @property
    def forced(self) -> bool:
        return self.signals > 1


def serve_http(app, backend, host: str, port: int, log_level: str, grace: float = 30.0) -> int:
    """Serve `app` until SIGINT / SIGTERM (module docstring: the grace period, a second signal).
    With ministack's engine, uvicorn runs on a second thread and the engine's step loop on this
    one (the thread that loaded the model); uvicorn's shutdown comes first, then the loop stops."""
    import signal
    import threading

    import uvicorn

    from serve.async_engine import AsyncEngine

    # uvicorn's own cap on waiting for connections: a backstop behind the engine's (fail_all)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + 5, lifespan="off"
    )  # the app has no startup or shutdown hooks; a forced exit would log a traceback cancelling it
    server = uvicorn.Server(config)
    if not isinstance(backend, AsyncEngine):
        server.run()
        return 0

    def http() -> None:
        try:
            server.run()
        finally:
            backend.close()

    shutdown = Shutdown(server, backend, grace)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shutdown)
    thread = threading.Thread(target=http, name="http")
    thread.start()
    try:
        backend.run()
    except Exception:  # the loop died: /health now answers 503 until the server is stopped
        logging.getLogger(__name__).exception("the engine's step loop died")
    thread.join()
    return 1 if shutdown.forced or not server.started else 0


def main(argv: list[str] | None = None) -> int:
    argv = (
        sys.argv[1:] if argv is None else argv
    )  # `python -m serve needle ...` as well as `ministack serve needle ...`
    if argv and argv[0] == "needle":
        from serve.needle import main as needle_main

        return needle_main(argv[1:])
    if argv and argv[0] == "ruler":
        from serve.ruler import main as ruler_main

        return ruler_main(argv[1:])
    args = parser().parse_args(argv)
    check_limits(args)
    from serve.api import build_app
    from serve.api.auth import access_line, resolve_api_key

    from pathlib import Path

    api_key = resolve_api_key(args.api_key, args.api_key_file)  # a bad key setting fails before the model loads
    template = None
    if args.chat_template is not None:
        if not Path(args.chat_template).is_file():
            raise SystemExit(f"ministack serve: --chat-template {args.chat_template!r} is not a file")
        template = Path(args.chat_template).read_text()
    from serve.embeddings import Embedder

    embedder = (
        None
        if args.embedding_model == "none"
        else Embedder(None if args.embedding_model == "minilm" else args.embedding_model)
    )
    backend = build_backend(args)
    app = build_app(
        backend,
        api_key=api_key,
        chat_template=template,
        trust_request_chat_template=args.trust_request_chat_template,
        embedder=embedder,
        max_request_bytes=args.max_request_bytes,
        public_metrics=args.public_metrics,
        hidden_metrics_version=args.show_hidden_metrics_for_version,
    )
    print(
        f"ministack serve: {backend.model_name} (max_model_len {backend.max_model_len}, engine {args.engine}) "
        f"on http://{args.host}:{args.port}/v1; {access_line(api_key, args.host, args.public_metrics)}",
        flush=True,
    )
    return serve_http(app, backend, args.host, args.port, args.log_level, args.shutdown_timeout)
