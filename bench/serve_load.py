"""Open-loop load on an OpenAI-compatible server: requests arrive at a stated rate whether or not
earlier ones finished (the closed-loop concurrency levels are bench/serve_throughput.py's), the
way vLLM's `vllm bench serve` drives a server, with its metric definitions:

  TTFT  first content chunk - request sent;   E2E  last chunk - request sent;
  TPOT  (E2E - TTFT) / (output tokens - 1), per request;   ITL  gaps between content chunks;
  goodput  requests per second that met every SLO (--slo-ttft-ms, --slo-tpot-ms).

Mean, p50, p90 and p99 of each. 429s (the server's "engine is overloaded") and other errors are
counted apart and left out of the latencies. Arrivals: gaps drawn from a gamma distribution of
mean 1/rate and shape --burstiness (1: Poisson; below 1: burstier), seeded. Workloads:
  random   prompts of --input-len tokens and --output-len new tokens (+-10 %), filler text;
  chat     a chat-like length mix: prompt and output lengths log-normal (medians 256 and 128);
  prefix   every prompt shares one --prefix-len-token document, then its own 32-token question
           (the prefix cache's case: report its hit rate from /metrics);
  mixed    --streams requests (64-token prompts, --stream-len new tokens) sent at once, then
           --num-prompts long prompts (--long-min..--long-max tokens, seeded) arriving at the rate
           while they decode: the inter-token latency a long prefill costs the streams
           (ministack's --max-itl-ms, passed with --max-itl-ms here, bounds it).
Each rate gets prompts of its own (no rate is served from an earlier one's prefix cache, except
the shared document of `prefix`, which is the point); --warmup requests run first, unmeasured.
Greedy with ignore_eos, so each request gets exactly the tokens it asked for.

    python bench/serve_load.py --rates 0.5,1,2,inf --workload chat --num-prompts 32 --out runs/load.json
    python bench/serve_load.py --url http://127.0.0.1:8000 ...          # a server already running
    python bench/serve_load.py --workload mixed --rates 0.2 --num-prompts 8 --max-itl-ms 80 --out runs/mixed.json

Without --url it starts `ministack serve` (and, with --vllm-python, vLLM's server after it, on
the same requests), one at a time, so no two engines share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.needle import haystack  # noqa: E402  (offline filler text)
from serve.weights import resolve_model  # noqa: E402
from serve_throughput import Request, free_port, server  # noqa: E402


@dataclass
class Outcome:
    sent: float
    status: int = 0  # HTTP status; 0 while running or on a transport error
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.chunk_times) and not self.error


def stats(values: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 in milliseconds (nearest-rank percentiles, as vLLM's benchmark)."""
    if not values:
        return {k: float("nan") for k in ("mean", "p50", "p90", "p99")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    return {"mean": sum(values) / len(values) * 1e3, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def workload(name: str, tokenizer, count: int, rng: random.Random, args) -> list[Request]:
    """`count` requests of the named workload, prompts cut from offline filler text."""
    text = tokenizer.encode(" ".join(haystack(rng, 4000 if name != "mixed" else 12000)), add_special_tokens=False)

    def cut(n: int) -> list[int]:
        at = rng.randrange(0, len(text) - n)
        return text[at : at + n]

    if name == "random":
        return [
            Request(
                cut(max(1, round(args.input_len * rng.uniform(0.9, 1.1)))),
                max(1, round(args.output_len * rng.uniform(0.9, 1.1))),
            )
            for _ in range(count)
        ]
    if name == "chat":
        return [
            Request(
                cut(min(2048, max(8, round(rng.lognormvariate(math.log(256), 0.8))))),
                min(512, max(4, round(rng.lognormvariate(math.log(128), 0.7)))),
            )
            for _ in range(count)
        ]
    if name == "prefix":
        document = args.shared_document
        return [Request(document + cut(32), args.output_len) for _ in range(count)]
    if name == "mixed":  # the streams first (open_loop sends them at once), then the long prompts
        return [Request(cut(64), args.stream_len) for _ in range(args.streams)] + [
            Request(cut(rng.randint(args.long_min, args.long_max)), args.output_len) for _ in range(count)
        ]
    raise ValueError(f"--workload must be random, chat, prefix or mixed, got {name!r}")


async def send(client: httpx.AsyncClient, model: str, request: Request) -> Outcome:
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = Outcome(time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:200]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = str(event["error"])[:200]
                if usage := event.get("usage"):
                    out.output_tokens, out.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                    out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if event.get("choices") and event["choices"][0].get("text"):
                    out.chunk_times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def open_loop(
    url: str,
    model: str,
    requests: list[Request],
    rate: float,
    burstiness: float,
    rng: random.Random,
    max_concurrency: int | None,
    at_once: int = 0,
) -> tuple[list[Outcome], float]:
    """Send each request at its arrival time (gamma gaps of mean 1/rate), not waiting for others;
    the first `at_once` all at the start."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def one(request: Request) -> Outcome:
            if gate is None:
                return await send(client, model, request)
            async with gate:
                return await send(client, model, request)

        tasks, start = [], time.perf_counter()
        for i, request in enumerate(requests):
            tasks.append(asyncio.create_task(one(request)))
            if math.isfinite(rate) and i + 1 >= at_once:
                await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))
        outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall: float, args) -> dict:
    good = [o for o in outcomes if o.ok]
    ttft = [o.chunk_times[0] - o.sent for o in good]
    e2e = [o.chunk_times[-1] - o.sent for o in good]
    tpot = [(o.chunk_times[-1] - o.chunk_times[0]) / (o.output_tokens - 1) for o in good if o.output_tokens > 1]
    itl = [b - a for o in good for a, b in zip(o.chunk_times, o.chunk_times[1:])]
    meets = [
        o
        for o in good
        if (o.chunk_times[0] - o.sent) * 1e3 <= args.slo_ttft_ms
        and (
            o.output_tokens <= 1
            or (o.chunk_times[-1] - o.chunk_times[0]) / (o.output_tokens - 1) * 1e3 <= args.slo_tpot_ms
        )
    ]
    output = sum(o.output_tokens for o in good)
    prompt = sum(o.prompt_tokens for o in good)
    return {
        "completed": len(good),
        "rejected_429": sum(o.status == 429 for o in outcomes),
        "errors": sum(not o.ok and o.status != 429 for o in outcomes),
        "wall_s": wall,
        "request_throughput": len(good) / wall,
        "output_throughput": output / wall,
        "total_token_throughput": (output + prompt) / wall,
        "goodput": len(meets) / wall,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "prefix_cache_hit_rate": sum(o.cached_tokens for o in good) / prompt if prompt else 0.0,
        "ttft_ms": stats(ttft),
        "tpot_ms": stats(tpot),
        "itl_ms": stats(itl),
        "e2e_ms": stats(e2e),
    }


def sweep(engine: str, url: str, tokenizer, args) -> list[dict]:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    rng = random.Random(args.seed)
    if args.warmup:
        asyncio.run(
            open_loop(url, model, workload("random", tokenizer, args.warmup, rng, args), math.inf, 1.0, rng, None)
        )
    rows = []
    for rate in args.rates:
        requests = workload(args.workload, tokenizer, args.num_prompts, random.Random(f"{args.seed}-{rate}"), args)
        at_once = args.streams if args.workload == "mixed" else 0
        outcomes, wall = asyncio.run(
            open_loop(
                url, model, requests, rate, args.burstiness, random.Random(args.seed), args.max_concurrency, at_once
            )
        )
        row = {"engine": engine, "rate": rate, **summarize(outcomes, wall, args)}
        rows.append(row)
        print(
            f"  {engine:<10} rate {rate:>5}/s: {row['completed']:>3} ok, {row['rejected_429']} 429, {row['errors']} errors; "
            f"{row['output_throughput']:7.1f} out tok/s, goodput {row['goodput']:.2f} req/s; TTFT p50 {row['ttft_ms']['p50']:7.0f} "
            f"p99 {row['ttft_ms']['p99']:7.0f} ms; TPOT p50 {row['tpot_ms']['p50']:5.0f} ms; "
            f"ITL p50 {row['itl_ms']['p50']:5.0f} p99 {row['itl_ms']['p99']:5.0f} ms",
            flush=True,
        )
    return rows


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--url", default=None, help="a running server; default: start ministack serve (and vLLM with --vllm-python)"
    )
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--rates", default="0.5,1,2,inf", help="request rates per second, comma-separated; inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    p.add_argument("--workload", default="chat", choices=("random", "chat", "prefix", "mixed"))
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=2048, help="the shared document of --workload prefix, tokens")
    p.add_argument(
        "--streams", type=int, default=8, help="--workload mixed: requests decoding when the long prompts arrive"
    )
    p.add_argument("--stream-len", type=int, default=1024, help="--workload mixed: the streams' new tokens")
    p.add_argument("--long-min", type=int, default=2048, help="--workload mixed: the long prompts' shortest, tokens")
    p.add_argument(
        "--long-max", type=int, default=7936, help="--workload mixed: their longest (+ --output-len within the context)"
    )
    p.add_argument("--max-itl-ms", type=float, default=None, help="start ministack serve with --max-itl-ms this")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default none)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", default=None, help="a python with vLLM installed: serve the same model with it too")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    args = p.parse_args(argv)
    args.rates = [math.inf if r.strip() == "inf" else float(r) for r in args.rates.split(",")]
    if args.burstiness <= 0:
        p.error("--burstiness must be > 0")
    if args.workload == "mixed" and not 1 <= args.long_min <= args.long_max:
        p.error("--workload mixed needs 1 <= --long-min <= --long-max")
    return args


def _peers(args: argparse.Namespace, model_dir: Path, tokenizer) -> list[dict]:
    """Start ministack serve (and vLLM with --vllm-python) on the model and sweep each in turn."""
    rows: list[dict] = []
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += f"--embedding-model none --max-num-batched-tokens {args.max_num_batched_tokens} --log-level warning".split()
    if args.max_itl_ms is not None:
        cmd += ["--max-itl-ms", str(args.max_itl_ms)]
    with server(cmd, port) as url:
        rows += sweep("ministack", url, tokenizer, args)
    if args.vllm_python:
        port = free_port()
        cmd = [
            args.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--port",
            str(port),
        ]
        cmd += f"--served-model-name vllm --max-num-batched-tokens {args.max_num_batched_tokens}".split()
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        with server(cmd, port, env=env, timeout=600) as url:
            rows += sweep("vllm", url, tokenizer, args)
    return rows


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = _args(argv)
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(args.seed)
    document = tokenizer.encode(" ".join(haystack(rng, args.prefix_len)), add_special_tokens=False)
    args.shared_document = document[: args.prefix_len]
    print(
        f"{args.workload} workload, {args.num_prompts} requests per rate, burstiness {args.burstiness}, seed {args.seed}, "
        f"max-itl-ms {args.max_itl_ms}; "
        f"SLOs TTFT {args.slo_ttft_ms:.0f} ms, TPOT {args.slo_tpot_ms:.0f} ms",
        flush=True,
    )
    rows = sweep("server", args.url, tokenizer, args) if args.url else _peers(args, model_dir, tokenizer)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        kept = {k: v for k, v in vars(args).items() if k != "shared_document"}
        Path(args.out).write_text(json.dumps({"args": kept, "rows": rows}, indent=1, default=str))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
