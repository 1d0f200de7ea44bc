"""Soak the OpenAI-compatible server: N concurrent clients for M minutes of mixed, partly hostile
traffic, then check that nothing broke, hung or leaked.

Each client loops over a seeded random mix of request kinds (`KINDS`): chat and completions,
streamed and not, n > 1, structured output (response_format json_schema), a stream the client
abandons after its first event, a prompt longer than the context, malformed JSON and a field of
the wrong type; besides them a burster sends more requests at once than the queue holds
(--max-queue + 16 every --burst-every seconds), so 429s are part of the run. A poller times
/health all along, a sampler reads the server's resident memory.

Goals, each printed PASS / FAIL (exit status 1 if any fails):
  no 5xx        no 5xx status and no server_error event inside a stream
  answered      every request answered as its kind expects (well-formed: 200 or a clean 429;
                malformed, wrong types, over-long: 400) within --request-timeout, none hung
  no leaks      vllm:num_requests_running / _waiting and vllm:kv_cache_usage_perc back to 0
                once the load stops (/metrics)
  memory        the server's RSS at the end within --rss-tolerance of its RSS after warm-up
                (both taken idle; skipped for --url without --pid)
  health        /health's worst latency under load below --health-limit (1 s)

    python bench/soak.py                                   # starts ministack serve: 64 clients x 5 min
    python bench/soak.py --clients 16 --seconds 60 --model /path/to/model -- --max-num-seqs 32
    python bench/soak.py --url http://127.0.0.1:8000 --max-queue 256 --pid 12345

Flags after `--` go to `ministack serve` unchanged. The server it starts gets --max-queue and
--embedding-model none; its log goes to a temporary file, whose tail is printed if it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

HUNG, TRANSPORT, CANCELLED = "hung", "transport error", "cancelled"


# ---- request kinds -------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of request: where it goes, its body (JSON, or raw bytes for malformed JSON),
    whether it is streamed or abandoned mid-stream, and the statuses that answer it correctly."""

    name: str
    path: str
    body: dict | bytes
    stream: bool = False
    cancel: bool = False
    expect: tuple[int, ...] = (200, 429)
    weight: int = 1


def kinds(max_model_len: int) -> list[Kind]:
    """The mix; `max_model_len` makes the over-long prompt one token too long."""
    chat = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16, "temperature": 0.7}
    prompt = {"prompt": "Once upon a time", "max_tokens": 16}
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    usage = {"stream_options": {"include_usage": True}}
    return [
        Kind("chat", "/v1/chat/completions", chat, weight=3),
        Kind("chat_stream", "/v1/chat/completions", {**chat, "stream": True, **usage}, stream=True, weight=3),
        Kind("completion", "/v1/completions", prompt, weight=2),
        Kind("completion_stream", "/v1/completions", {**prompt, "stream": True}, stream=True, weight=2),
        Kind("n3", "/v1/completions", {**prompt, "n": 3, "seed": 1}),
        Kind("n2_stream", "/v1/chat/completions", {**chat, "n": 2, "stream": True}, stream=True),
        Kind(
            "json_schema",
            "/v1/chat/completions",
            {
                **chat,
                "max_tokens": 48,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
            },
        ),
        Kind("cancel", "/v1/completions", {**prompt, "max_tokens": 64, "stream": True}, stream=True, cancel=True),
        Kind("overlong", "/v1/completions", {"prompt": [11] * max_model_len, "max_tokens": 1}, expect=(400,)),
        Kind("malformed", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', expect=(400,)),
        Kind("wrong_type", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, expect=(400,)),
    ]


def burst_kind() -> Kind:
    return Kind("burst", "/v1/completions", {"prompt": "Hi", "max_tokens": 4})


# ---- outcomes ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request's end: its status (or HUNG / TRANSPORT / CANCELLED), seconds, what it saw."""

    kind: Kind
    status: int | str
    seconds: float
    server_error_event: bool = False  # a streamed {"error": {"type": "server_error"}} event
    detail: str = ""

    @property
    def expected(self) -> bool:
        if self.kind.cancel:
            return self.status in (CANCELLED, 429)
        return self.status in self.kind.expect and not self.server_error_event

    @property
    def five_xx(self) -> bool:
        return (isinstance(self.status, int) and self.status >= 500) or self.server_error_event


async def send(client: httpx.AsyncClient, kind: Kind, timeout: float) -> Outcome:
    """Send one request of `kind` and classify its answer; a request not answered in `timeout`
    seconds is HUNG (the client gives up on it, which also aborts it server-side)."""
    started = time.monotonic()
    try:
        status, bad_event, detail = await asyncio.wait_for(exchange(client, kind), timeout)
    except TimeoutError:
        return Outcome(kind, HUNG, time.monotonic() - started)
    except httpx.HTTPError as exc:
        return Outcome(kind, TRANSPORT, time.monotonic() - started, detail=repr(exc))
    return Outcome(kind, status, time.monotonic() - started, bad_event, detail)


async def exchange(client: httpx.AsyncClient, kind: Kind) -> tuple[int | str, bool, str]:
    """(status, a server_error event seen, detail) of one request."""
    content = kind.body if isinstance(kind.body, bytes) else json.dumps(kind.body).encode()
    headers = {"content-type": "application/json"}
    async with client.stream("POST", kind.path, content=content, headers=headers) as response:
        if response.status_code != 200 or not kind.stream:
            body = (await response.aread()).decode(errors="replace")
            return response.status_code, False, body[:200] if response.status_code != 200 else ""
        bad_event, done = False, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if kind.cancel:
                return CANCELLED, False, ""  # leaving the block closes the connection mid-stream
            data = line[len("data: ") :]
            done = done or data == "[DONE]"
            if data.startswith('{"error"'):
                bad_event = bad_event or json.loads(data)["error"].get("type") == "server_error"
        return 200, bad_event, "" if done else "stream ended without [DONE]"


# ---- the server's side: metrics, health, memory --------------------------------------------


IDLE_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


async def idle_gauges(client: httpx.AsyncClient) -> dict[str, float]:
    """The gauges that must return to 0 when nothing is in flight, from /metrics."""
    text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^([\w:]+)\{[^}]*\} (\S+)$", line)
        if match and match.group(1) in IDLE_METRICS:
            values[match.group(1)] = float(match.group(2))
    return values


async def wait_idle(client: httpx.AsyncClient, seconds: float) -> dict[str, float]:
    """The idle gauges once all are 0, or as they stand after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        gauges = await idle_gauges(client)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.25)


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (psutil where installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
    return psutil.Process(pid).memory_info().rss


@dataclass
class Watch:
    """What the background watchers saw: /health latencies and failures, peak RSS."""

    health_worst_s: float = 0.0
    health_polls: int = 0
    health_failures: int = 0
    health_first_failure: str = ""  # what the first failed poll got: its status or the client's error
    rss_peak: int = 0


async def watch_health(url: str, watch: Watch, interval: float, stop: asyncio.Event) -> None:
    """Poll /health on a connection of its own, as a load balancer's probe does: the load's
    pooled connections idle past the server's keep-alive between phases, and a poll must not
    count the client's stale socket as the server's failure."""
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1)) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = (await client.get("/health", timeout=10)).status_code
                got = f"HTTP {status}"
            except httpx.HTTPError as exc:
                status, got = None, f"{type(exc).__name__}: {exc}"
            watch.health_worst_s = max(watch.health_worst_s, time.monotonic() - started)
            watch.health_polls += 1
            if status != 200:
                watch.health_failures += 1
                watch.health_first_failure = watch.health_first_failure or got
            await sleep_unless(stop, interval)


async def watch_memory(pid: int, watch: Watch, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        watch.rss_peak = max(watch.rss_peak, rss_bytes(pid))
        await sleep_unless(stop, interval)


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


# ---- the load ------------------------------------------------------------------------------


@dataclass
class Options:
    """What one soak does (the command line's flags, or a test's choice)."""

    url: str
    clients: int = 64
    seconds: float = 300.0
    warmup_seconds: float = 20.0
    max_queue: int = 64
    burst_every: float = 30.0
    request_timeout: float = 120.0
    health_interval: float = 0.5
    health_limit: float = 1.0
    rss_tolerance: float = 0.05
    idle_timeout: float = 60.0
    settle_seconds: float = (
        10.0  # idle time before each RSS reading: the step loop trims its heap once idle (serve.async_engine)
    )
    pid: int | None = None
    api_key: str | None = None
    seed: int = 0


async def client_loop(
    client: httpx.AsyncClient,
    mix: list[Kind],
    rng: random.Random,
    until: float,
    timeout: float,
    outcomes: list[Outcome],
) -> None:
    weights = [k.weight for k in mix]
    while time.monotonic() < until:
        outcomes.append(await send(client, rng.choices(mix, weights)[0], timeout))


async def burster(
    client: httpx.AsyncClient, size: int, every: float, until: float, timeout: float, outcomes: list[Outcome]
) -> None:
    """`size` requests at once every `every` seconds (the first right away)."""
    while time.monotonic() < until:
        outcomes += await asyncio.gather(*(send(client, burst_kind(), timeout) for _ in range(size)))
        await asyncio.sleep(max(0.0, min(every, until - time.monotonic())))


async def load(client: httpx.AsyncClient, options: Options, seconds: float, seed: int) -> list[Outcome]:
    """Every client and the burster for `seconds`; every request's outcome."""
    models = (await client.get("/v1/models")).json()["data"]
    mix = kinds(models[0]["max_model_len"])
    until = time.monotonic() + seconds
    outcomes: list[Outcome] = []
    loops = [
        client_loop(client, mix, random.Random(seed * 1000 + i), until, options.request_timeout, outcomes)
        for i in range(options.clients)
    ]
    loops.append(burster(client, options.max_queue + 16, options.burst_every, until, options.request_timeout, outcomes))
    await asyncio.gather(*loops)
    return outcomes


@dataclass
class Memory:
    start: int = 0
    warm: int = 0
    peak: int = 0
    end: int = 0


@dataclass
class SoakResult:
    """One soak's record: every outcome of the measured load, what the watchers saw, the idle
    gauges at the end, the server's memory."""

    options: Options
    outcomes: list[Outcome]
    watch: Watch
    gauges: dict[str, float]
    memory: Memory | None
    seconds: float
    drained: bool  # the warm-up's requests were all done before the measured load began


async def soak(options: Options) -> SoakResult:
    """Warm up (all clients, --warmup-seconds), let the server go idle, then the measured load
    with the watchers running, then idle again."""
    limits = httpx.Limits(max_connections=options.clients + options.max_queue + 64, max_keepalive_connections=32)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    async with httpx.AsyncClient(
        base_url=options.url, limits=limits, headers=headers, timeout=options.request_timeout
    ) as client:
        memory = Memory(start=rss_bytes(options.pid)) if options.pid else None
        await load(client, options, options.warmup_seconds, options.seed + 1)
        warm_gauges = await wait_idle(client, options.idle_timeout)
        await asyncio.sleep(options.settle_seconds)  # idle long enough for the server to return freed heap
        watch, stop = Watch(), asyncio.Event()
        watchers = [asyncio.ensure_future(watch_health(options.url, watch, options.health_interval, stop))]
        if memory is not None:
            memory.warm = rss_bytes(options.pid)
            watchers.append(asyncio.ensure_future(watch_memory(options.pid, watch, 0.5, stop)))
        started = time.monotonic()
        outcomes = await load(client, options, options.seconds, options.seed)
        elapsed = time.monotonic() - started
        stop.set()
        await asyncio.gather(*watchers)
        gauges = await wait_idle(client, options.idle_timeout)
        await asyncio.sleep(options.settle_seconds)
        if memory is not None:
            memory.peak, memory.end = max(watch.rss_peak, memory.warm), rss_bytes(options.pid)
    return SoakResult(options, outcomes, watch, gauges, memory, elapsed, drained=not any(warm_gauges.values()))


# ---- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    passed: bool | None  # None: not measured
    detail: str


def goals(result: SoakResult) -> list[Goal]:
    outcomes, watch, memory, options = result.outcomes, result.watch, result.memory, result.options
    five = [o for o in outcomes if o.five_xx]
    hung = [o for o in outcomes if o.status == HUNG]
    wrong = [o for o in outcomes if not o.expected]
    leaked = {name: v for name, v in result.gauges.items() if v}
    out = [
        Goal(
            "no 5xx",
            not five,
            f"{len(five)} 5xx" + (f" (first: {five[0].kind.name} {five[0].status} {five[0].detail})" if five else ""),
        ),
        Goal(
            "answered",
            not wrong,
            f"{len(hung)} hung past {options.request_timeout:g} s, {len(wrong)} not as expected"
            + (f" (first: {wrong[0].kind.name} -> {wrong[0].status} {wrong[0].detail})" if wrong else ""),
        ),
        Goal(
            "no leaks",
            not leaked and len(result.gauges) == len(IDLE_METRICS),
            ", ".join(f"{k.split(':')[1]} {v:g}" for k, v in sorted(result.gauges.items())) + " after the load",
        ),
        Goal(
            "health",
            watch.health_worst_s < options.health_limit and not watch.health_failures,
            f"worst {watch.health_worst_s * 1000:.0f} ms over {watch.health_polls} polls (limit {options.health_limit * 1000:.0f} ms), "
            f"{watch.health_failures} not 200"
            + (f" (first: {watch.health_first_failure})" if watch.health_failures else ""),
        ),
    ]
    if memory is None:
        out.append(Goal("memory", None, "not measured: --url without --pid"))
    else:
        growth = memory.end / memory.warm - 1
        out.append(
            Goal(
                "memory",
                growth <= options.rss_tolerance,
                f"end {growth * 100:+.1f} % vs after warm-up (limit +{options.rss_tolerance * 100:g} %)",
            )
        )
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(result: SoakResult) -> str:
    """The table by kind and outcome, latencies, memory, and one PASS / FAIL line per goal."""
    by_kind: dict[str, list[Outcome]] = {}
    for o in result.outcomes:
        by_kind.setdefault(o.kind.name, []).append(o)
    lines = [
        f"{len(result.outcomes)} requests in {result.seconds:.0f} s ({result.options.clients} clients + bursts of "
        f"{result.options.max_queue + 16})",
        f"{'kind':<18}{'total':>7}{'200':>7}{'400':>7}{'429':>7}{'cancel':>7}{'other':>7}{'5xx':>6}  {'p50 s':>7}{'p99 s':>7}",
    ]
    for name, rows in sorted(by_kind.items()):
        n = {s: sum(o.status == s for o in rows) for s in (200, 400, 429, CANCELLED)}
        other = len(rows) - sum(n.values())
        answered = [o.seconds for o in rows if o.expected and o.status != 429]  # 429s answer at once: not latency
        lines.append(
            f"{name:<18}{len(rows):>7}{n[200]:>7}{n[400]:>7}{n[429]:>7}{n[CANCELLED]:>7}{other:>7}{sum(o.five_xx for o in rows):>6}  "
            f"{percentile(answered, 0.5):>7.2f}{percentile(answered, 0.99):>7.2f}"
        )
    if not result.drained:
        lines.append(
            f"note: the warm-up's requests were still in flight after {result.options.idle_timeout:g} s: the "
            "measured load began on a backlog, and the after-warm-up RSS was not taken idle"
        )
    if result.memory is not None:
        m = result.memory
        lines.append("server RSS MiB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in vars(m).items()))
    lines += [
        f"{'PASS' if g.passed else 'SKIP' if g.passed is None else 'FAIL'}  {g.name}: {g.detail}" for g in goals(result)
    ]
    return "\n".join(lines)


# ---- the server, when this script starts it ------------------------------------------------


@contextmanager
def started_server(
    port: int, max_queue: int, model: str | None, extra: list[str], timeout: float = 600.0
) -> Iterator[subprocess.Popen]:
    """`ministack serve` on 127.0.0.1:`port`, up once /health answers; stopped (SIGTERM, then
    killed) on exit. Its log goes to a temporary file, printed in part if it dies."""
    cmd = [
        sys.executable,
        "-m",
        "serve",
        "--port",
        str(port),
        "--max-queue",
        str(max_queue),
        "--embedding-model",
        "none",
        "--log-level",
        "warning",
        *(["--model", model] if model else []),
        *extra,
    ]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            deadline = time.monotonic() + timeout
            while not answers(f"http://127.0.0.1:{port}/health"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"ministack serve did not start ({' '.join(cmd)}):\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start ministack serve)")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, to watch its memory")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="the started server's model (default: its own, SmolLM2-135M)")
    p.add_argument("--clients", type=int, default=64)
    duration = p.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, default=None)
    duration.add_argument("--seconds", type=float, default=None, help="default: 5 minutes")
    p.add_argument("--warmup-seconds", type=float, default=20.0)
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=10.0,
        help="idle seconds before each RSS reading (the server gives freed heap back once idle)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="the server's --max-queue (passed to the one started here); bursts exceed it by 16",
    )
    p.add_argument("--burst-every", type=float, default=30.0)
    p.add_argument("--request-timeout", type=float, default=120.0, help="a request unanswered this long counts as hung")
    p.add_argument("--health-limit", type=float, default=1.0, help="seconds /health may take under load")
    p.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS growth, end vs after warm-up")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 5)
    options = Options(
        url=args.url or "",
        clients=args.clients,
        seconds=seconds,
        warmup_seconds=args.warmup_seconds,
        max_queue=args.max_queue,
        burst_every=args.burst_every,
        request_timeout=args.request_timeout,
        health_limit=args.health_limit,
        rss_tolerance=args.rss_tolerance,
        pid=args.pid,
        api_key=args.api_key,
        seed=args.seed,
        settle_seconds=args.settle_seconds,
    )
    if args.url:
        result = asyncio.run(soak(options))
    else:
        port = free_port()
        with started_server(port, args.max_queue, args.model, extra) as proc:
            options.url, options.pid = f"http://127.0.0.1:{port}", proc.pid
            result = asyncio.run(soak(options))
    print(report(result))
    return 0 if all(g.passed is not False for g in goals(result)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
