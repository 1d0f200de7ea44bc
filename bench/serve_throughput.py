"""Serving throughput and latency of ministack's server, beside peers measured in the same run.

At each concurrency (1, 4, 16, 64 by default) a closed loop of streaming clients sends
requests of mixed prompt lengths (token ids, so every engine sees the same tokens), each asking
for its own number of new tokens (--output-tokens: one length, or a mix such as 16,64,256, the
way real requests differ), greedy with ignore_eos so exactly that many come back. Each level
gets requests of its own, so no level is served from an earlier one's prefix cache. Reported:
output tokens/s (the tokens requested and delivered), time to first token and inter-token
latency (p50, p99), and, for servers that export vLLM's MFU counters
(`vllm:estimated_flops_per_gpu_total`, `..._read_bytes_...`, `..._write_bytes_...`: ministack
always, vLLM with --enable-mfu-metrics), MFU and MBU over the level: the counters' growth over
its wall time against the device's peak and its probed memory bandwidth (profiling.bandwidth).
The bytes are the server's model of what its steps moved, prefill included. Peers on the same requests:
  * transformers' batched `generate`: left-padded batches of `concurrency` requests, each
    batch generating as many tokens as its longest request asks (a static batch ends when
    its last member does; only the requested tokens count), in this process;
  * vLLM's own OpenAI server (its CPU build) serving the same model, with --vllm-python.
Then the long-context figures: the TTFT of one 8k-token prompt against its FLOPs and this
CPU's measured matmul peak (profiling.cpu), and the TTFT of a second prompt sharing that
8k prefix (prefix caching: the ratio says how much of the prefill it saved).

    python bench/serve_throughput.py --concurrency 1,4,16 --output-tokens 32 --vllm-python /work/vllm-venv/bin/python

Servers run as subprocesses, all started before the first measurement; an idle one takes next
to no CPU time, so each measurement has the cores to itself. With --repeats N every engine measures
every level once per round, the rounds starting with a different engine in turn: this VM's
speed drifts by tens of percent over minutes, and engines measured one after another would
compare the drift as much as the engines. The table gives each engine's median and its ratio
to each peer (transformers, vLLM) within each round: worst, median, best.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.needle import haystack  # noqa: E402  (offline filler text)
from serve.weights import resolve_model  # noqa: E402


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass
class Sample:
    start: float
    token_times: list[float] = field(default_factory=list)
    usage: dict | None = None

    @property
    def tokens(self) -> int:
        """Tokens delivered: the server's count (an SSE event may carry several), else events."""
        return (self.usage or {}).get("completion_tokens", len(self.token_times))

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start


@dataclass
class Level:
    engine: str
    concurrency: int
    tokens_per_s: float
    ttft: list[float]
    itl: list[float]
    repeat: int = 0  # which round of --repeats measured it
    wall_s: float = 0.0
    counted: dict[str, float] = field(
        default_factory=dict
    )  # the server's MFU counters' growth over the level: flops, bytes


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], port: int, env: dict[str, str] | None = None, timeout: float = 400.0):
    """A server subprocess, up once /health answers; killed on exit."""
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {timeout:.0f} s")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def model_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


async def stream_one(client: httpx.AsyncClient, model: str, request: Request) -> Sample:
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                sample.usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                sample.token_times.append(time.perf_counter())
    return sample


async def closed_loop(url: str, requests: list[Request], concurrency: int) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request as soon as the last one finished."""
    model = model_id(url)
    queue = list(reversed(requests))
    samples: list[Sample] = []
    async with httpx.AsyncClient(
        base_url=url, timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def worker() -> None:
            while queue:
                samples.append(await stream_one(client, model, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return samples, wall


MFU_COUNTERS = {
    "flops": ("vllm:estimated_flops_per_gpu_total",),
    "bytes": ("vllm:estimated_read_bytes_per_gpu_total", "vllm:estimated_write_bytes_per_gpu_total"),
}


def mfu_counters(url: str) -> dict[str, float]:
    """The server's vLLM MFU counters now, summed over labels: {"flops", "bytes"} (read + write);
    empty where it exports none (vLLM without --enable-mfu-metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        for key, names in MFU_COUNTERS.items():
            if name in names:
                values[key] = values.get(key, 0.0) + float(line.rpartition(" ")[2])
    return values


def utilisation(level: Level, peak_flops: float, bandwidth: float) -> tuple[float, float]:
    """(MFU, MBU) of a level from its server's counters' growth over its wall time; nan where
    the server exports no such counters or the peak or bandwidth is unknown."""

    def rate(key: str, over: float) -> float:
        return (
            level.counted[key] / level.wall_s / over
            if key in level.counted and level.wall_s > 0 and over > 0
            else float("nan")
        )

    return rate("flops", peak_flops), rate("bytes", bandwidth)


def measure_server(engine: str, url: str, work: dict[int, list[Request]], repeat: int = 0) -> list[Level]:
    out = []
    for c, requests in work.items():
        before = mfu_counters(url)
        samples, wall = asyncio.run(closed_loop(url, requests, c))
        after = mfu_counters(url)
        tokens = sum(s.tokens for s in samples)
        itl = [b - a for s in samples for a, b in zip(s.token_times, s.token_times[1:])]
        counted = {k: after[k] - before.get(k, 0.0) for k in after}
        out.append(Level(engine, c, tokens / wall, [s.ttft for s in samples], itl, repeat, wall, counted))
        print(
            f"  {engine:<12} c={c:<3} {tokens / wall:8.1f} tok/s  TTFT p50 {pct(out[-1].ttft, 0.5) * 1e3:7.0f} ms  "
            f"ITL p50 {pct(itl, 0.5) * 1e3:6.0f} ms",
            flush=True,
        )
    return out


class TransformersPeer:
    """transformers' batched greedy generate, batches of `concurrency` left-padded prompts, each
    batch generating its longest request's tokens; only the requested tokens count. The model is
    loaded once, in this process, and warmed up."""

    def __init__(self, model_dir: Path, warm_up: list[Request], device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.run([r.prompt for r in warm_up], 4)

    def run(self, batch: list[list[int]], new: int) -> float:
        import torch

        width = max(map(len, batch))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
        start = time.perf_counter()
        with torch.no_grad():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=self.pad,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def measure(self, work: dict[int, list[Request]], repeat: int = 0) -> list[Level]:
        out = []
        for c, requests in work.items():
            wall, ttft = 0.0, []
            for i in range(0, len(requests), c):
                batch = requests[i : i + c]
                prompts = [r.prompt for r in batch]
                first = self.run(prompts, 1)  # a batch's first token arrives after its whole prefill
                ttft += [first] * len(batch)
                wall += self.run(prompts, max(r.max_tokens for r in batch))
            out.append(Level("transformers", c, sum(r.max_tokens for r in requests) / wall, ttft, [], repeat))
            print(
                f"  {'transformers':<12} c={c:<3} {out[-1].tokens_per_s:8.1f} tok/s  TTFT p50 {pct(ttft, 0.5) * 1e3:7.0f} ms",
                flush=True,
            )
        return out


def long_prefix(url: str, tokens: list[int], tail: list[int]) -> dict:
    """TTFT of an 8k prompt, then of a second prompt sharing its prefix."""
    first = asyncio.run(closed_loop(url, [Request(tokens, 1)], 1))[0][0]
    second = asyncio.run(closed_loop(url, [Request(tokens + tail, 1)], 1))[0][0]
    print(f"  long prompt: TTFT {first.ttft:.2f} s, sharing its prefix {second.ttft * 1e3:.0f} ms", flush=True)
    return {"ttft_s": first.ttft, "shared_ttft_s": second.ttft, "usage": first.usage, "shared_usage": second.usage}


def request_set(
    tokenizer, prompt_lengths: list[int], output_lengths: list[int], count: int, rng: random.Random
) -> list[Request]:
    """`count` requests cycling through every (prompt length, output length) pairing, shuffled;
    prompts are slices of offline filler text."""
    text = tokenizer.encode(" ".join(haystack(rng, 2000)), add_special_tokens=False)
    requests = []
    for i in range(count):
        n = prompt_lengths[i % len(prompt_lengths)]
        at = rng.randrange(0, len(text) - n)
        requests.append(Request(text[at : at + n], output_lengths[i // len(prompt_lengths) % len(output_lengths)]))
    rng.shuffle(requests)
    return requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    p.add_argument("--prompt-lengths", default="32,128,512", help="mixed prompt lengths, tokens")
    p.add_argument("--output-tokens", default="64", help="new tokens per request: one length, or a mix, e.g. 16,64,256")
    p.add_argument("--long-prompt", type=int, default=8000, help="tokens of the long-context prompt; 0 skips it")
    p.add_argument("--vllm-python", default=None, help="a python with vLLM installed: serve the same model with it too")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (every engine runs there)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="ministack's per-step token budget")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bf16 where this device runs it fast (profiling.cpu), else float32; every engine runs it",
    )
    p.add_argument(
        "--half-weights",
        default="off",
        choices=("auto", "on", "off", "both"),
        help="ministack's float16-stored weights on the CPU (float32 math); both: one server with, one without",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds: every engine measures every level once a round, in turn (all kept running), so drift in the machine's speed hits each alike",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


Work = dict[int, list[Request]]  # concurrency -> the requests its level sends


@dataclass
class Workload:
    """Every request the run sends, drawn from one seeded RNG in a fixed order."""

    levels: list[int]
    prompt_lengths: list[int]
    output_lengths: list[int]
    rounds: list[Work]  # each round its own requests: no round is served from another's prefix cache
    warm_up: list[Request]
    long_tokens: list[int]  # the long-context prompt
    tail: list[int]  # what the second long prompt adds to the first's prefix
    max_len: int  # the servers' --max-model-len: room for the longest request


def make_workload(args: argparse.Namespace, tokenizer) -> Workload:
    levels = [int(c) for c in args.concurrency.split(",")]
    prompt_lengths = [int(n) for n in args.prompt_lengths.split(",")]
    output_lengths = [int(n) for n in args.output_tokens.split(",")]
    rng = random.Random(args.seed)

    def work() -> Work:
        return {c: request_set(tokenizer, prompt_lengths, output_lengths, max(c, args.requests), rng) for c in levels}

    first = work()
    warm_up = [Request(r.prompt[:8], 4) for r in request_set(tokenizer, [16], [4], 2, rng)]
    long_tokens = tokenizer.encode(" ".join(haystack(rng, args.long_prompt // 8)), add_special_tokens=False)[
        : args.long_prompt
    ]
    tail = tokenizer.encode(" And then, at last, the story ended.", add_special_tokens=False)
    rounds = [first] + [work() for _ in range(args.repeats - 1)]
    max_len = max(args.long_prompt + len(tail) + 8, max(prompt_lengths) + max(output_lengths) + 8)
    return Workload(levels, prompt_lengths, output_lengths, rounds, warm_up, long_tokens, tail, max_len)


def peer_dtype(dtype: str, device: str) -> str:
    """What "auto" is for the peers: what ministack's "auto" picks (bf16 on a GPU and on a CPU that
    runs it clearly faster than fp32, float32 elsewhere), so every engine runs one dtype."""
    if dtype != "auto":
        return dtype
    from profiling.hardware import auto_dtype

    return {"bf16": "bfloat16", "fp32": "float32"}[auto_dtype(device)]


def start_servers(
    stack: ExitStack, args: argparse.Namespace, model_dir: Path, load: Workload, dtype: str
) -> dict[str, str]:
    """ministack's server (with and without half weights, per --half-weights) and vLLM's, each up
    until `stack` closes: name -> URL."""
    servers: dict[str, str] = {}
    for half in ("off", "on") if args.half_weights == "both" else (args.half_weights,):
        name = "ministack-half" if half == "on" else "ministack"
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--half-weights",
            half,
            "--max-model-len",
            str(load.max_len),
            "--max-num-seqs",
            str(max(load.levels)),
            "--kv-cache-gb",
            "2",
            "--log-level",
            "warning",
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
        ]
        print(f"{name}: {' '.join(cmd[1:])}", flush=True)
        servers[name] = stack.enter_context(server(cmd, port))
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
            "--dtype",
            dtype,
            "--max-model-len",
            str(load.max_len),
            "--max-num-seqs",
            str(max(load.levels)),
            "--kv-cache-memory-bytes",
            str(2 << 30),
            "--disable-log-stats",
        ]
        print(f"vLLM: {' '.join(cmd[1:])}", flush=True)
        servers["vllm"] = stack.enter_context(
            server(cmd, port, env={"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"})
        )
    return servers


Engine = Callable[[Work, int], list[Level]]  # (a round's requests, the round) -> its levels


def warm_engines(
    servers: dict[str, str], args: argparse.Namespace, model_dir: Path, load: Workload, dtype: str
) -> dict[str, Engine]:
    """Every engine warmed up, the servers' and transformers' in this process (unless skipped)."""
    engines: dict[str, Engine] = {}
    for name, url in servers.items():
        asyncio.run(closed_loop(url, load.warm_up, 1))
        engines[name] = functools.partial(measure_server, name, url)
    if not args.skip_transformers:
        print("transformers generate (in process)", flush=True)
        engines["transformers"] = TransformersPeer(model_dir, load.warm_up, args.device, dtype).measure
    return engines


def measure_rounds(engines: dict[str, Engine], rounds: list[Work]) -> list[Level]:
    """Every engine on every round's requests, each round starting with the next engine."""
    names, results = list(engines), []
    for repeat, work in enumerate(rounds):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        if len(rounds) > 1:
            print(f"round {repeat + 1} of {len(rounds)}: {', '.join(order)}", flush=True)
        for name in order:
            results += engines[name](work, repeat)
    return results


def print_levels(
    args: argparse.Namespace,
    shape,
    dtype: str,
    load: Workload,
    results: list[Level],
    names: list[str],
    peak_flops: float,
    bandwidth: float,
) -> None:
    """The throughput table: per engine and concurrency, the median tok/s, its ratio to each peer
    round by round, the TTFT and ITL percentiles over every round's requests, and the median MFU
    and MBU where the server counts its FLOPs and bytes."""
    half_note = "; ministack-half: float16-stored weights, float32 math" if args.half_weights in ("on", "both") else ""
    mixed = " (mixed)" if len(load.prompt_lengths) > 1 or len(load.output_lengths) > 1 else ""
    print(
        f"\n{shape}, {args.dtype} on {args.device} (peers: {dtype}{half_note})\nprompts of {args.prompt_lengths} tokens, outputs of {args.output_tokens} tokens{mixed}, greedy, ignore_eos"
        + (
            f"; {args.repeats} rounds, each engine once a round, in turn (median tok/s; the ratios to each peer within a round: worst, median, best; "
            "TTFT and ITL percentiles over every round's requests)"
            if args.repeats > 1
            else ""
        )
        + "\n"
    )
    peers = [
        name for name in ("transformers", "vllm") if name in names
    ]  # the ratio columns: each engine against each peer, round by round
    columns = [
        "engine",
        "concurrency",
        "output tok/s",
        *(f"vs {peer}" for peer in peers),
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "MFU",
        "MBU",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rate = {(r.engine, r.concurrency, r.repeat): r.tokens_per_s for r in results}
    for (engine, c), rows in groupby(
        sorted(results, key=lambda r: (names.index(r.engine), r.concurrency)), key=lambda r: (r.engine, r.concurrency)
    ):
        rows = list(rows)
        cells = []
        for peer in peers:
            ratios = sorted(r.tokens_per_s / rate[peer, c, r.repeat] for r in rows if (peer, c, r.repeat) in rate)
            cells.append(
                "-"
                if not ratios
                else f"{ratios[0]:.2f}x"
                if len(ratios) == 1
                else f"{ratios[0]:.2f}x, {statistics.median(ratios):.2f}x, {ratios[-1]:.2f}x"
            )
        ttft = [t for r in rows for t in r.ttft]
        itl = [t for r in rows for t in r.itl]
        itl_cells = f"{pct(itl, 0.5) * 1e3:.0f} ms | {pct(itl, 0.99) * 1e3:.0f} ms" if itl else "- | -"
        used = [statistics.median(u) for u in zip(*(utilisation(r, peak_flops, bandwidth) for r in rows))]
        used_cells = ["-" if u != u else f"{u:.1%}" for u in used]  # nan: the server counts none
        print(
            "| "
            + " | ".join(
                [
                    engine,
                    str(c),
                    f"{statistics.median(r.tokens_per_s for r in rows):.1f}",
                    *cells,
                    f"{pct(ttft, 0.5) * 1e3:.0f} ms",
                    f"{pct(ttft, 0.99) * 1e3:.0f} ms",
                    itl_cells,
                    *used_cells,
                ]
            )
            + " |"
        )


def print_long_context(long: dict[str, dict], shape, load: Workload, peak) -> None:
    """The long prompt's TTFT against its FLOPs and the peak, and the shared prefix's speed-up."""
    from profiling.formulas.llama import decoder_flops
    from profiling.hardware import format_rate

    formula = sum(decoder_flops(shape, q_len=len(load.long_tokens), past_len=0, logits=1).values())
    print(
        f"\nlong context: {len(load.long_tokens)}-token prompt, then the same prefix + {len(load.tail)} tokens; "
        f"{peak.device} {peak.dtype} peak {format_rate(peak.flops)} ({peak.source})\n"
    )
    print("| engine | TTFT | prefill FLOPs | achieved | of peak | shared-prefix TTFT | speed-up | cached tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, m in long.items():
        flops = (m["usage"].get("flops") or {}).get("measured", formula)
        peak.observe(flops / m["ttft_s"], by=f"{engine}'s long prefill")  # a stale peak is raised, not exceeded
        cached = (m["shared_usage"].get("prompt_tokens_details") or {}).get("cached_tokens", "-")
        print(
            f"| {engine} | {m['ttft_s']:.2f} s | {flops:.3e} | {flops / m['ttft_s'] / 1e9:.1f} GFLOP/s | "
            f"{flops / m['ttft_s'] / peak.flops:.1%} | {m['shared_ttft_s'] * 1e3:.0f} ms | {m['ttft_s'] / m['shared_ttft_s']:.1f}x | {cached} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    from profiling.formulas.llama import DecoderShape
    from profiling.bandwidth import device_bandwidth, format_bandwidth
    from profiling.hardware import device_peak, format_rate

    model_dir = resolve_model(args.model)
    load = make_workload(args, AutoTokenizer.from_pretrained(model_dir))
    shape = DecoderShape.from_hf(AutoConfig.from_pretrained(model_dir))
    dtype = peer_dtype(args.dtype, args.device)
    if args.device == "cpu":  # the CPU's peak is measured now, before any engine runs, with the load beside it
        from profiling.cpu import cpu_peaks

        cpu_peaks(reprobe=True)
    peak = device_peak(args.device, dtype)
    print(f"peak: {peak.device} {peak.dtype} {format_rate(peak.flops)} ({peak.source})", flush=True)
    bw = device_bandwidth(args.device, reprobe=args.device == "cpu")  # the CPU's, like its peak, probed now
    print(f"memory bandwidth: {bw.device} {format_bandwidth(bw.bytes_per_s)} ({bw.source})", flush=True)
    # every engine started (and warmed up) before the first round and kept until the last; the
    # idle ones wait on a socket (measured: 0.02 s of CPU time in 10 s idle for ministack's server,
    # 0.17 s for vLLM's), so each measurement has the cores to itself
    with ExitStack() as stack:
        servers = start_servers(stack, args, model_dir, load, dtype)
        engines = warm_engines(servers, args, model_dir, load, dtype)
        results = measure_rounds(engines, load.rounds)
        long = (
            {name: long_prefix(url, load.long_tokens, load.tail) for name, url in servers.items()}
            if args.long_prompt
            else {}
        )
    print_levels(args, shape, dtype, load, results, list(engines), peak.flops, bw.bytes_per_s)
    if long:
        print_long_context(long, shape, load, peak)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
