"""Context caching across a restart: the TTFT of a long document sent cold, sent again to the
same server (its blocks in memory), and sent again after the server restarted (its blocks on
the disk tier, `--kv-cache-disk`), each followed by a different question.

Each run starts `ministack serve` with a fresh disk directory, sends the document (random
filler text of --tokens tokens) plus a question, then the document plus another question
(memory), then restarts the server on the same directory and sends the document plus a third
question (disk). Prints the three TTFTs, the ratios to the cold one, and the cached tokens
each response reported (`usage.prompt_tokens_details`).

    python bench/context_cache.py --tokens 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_throughput import Request, closed_loop, free_port, server  # noqa: E402

from serve.needle import haystack  # noqa: E402
from serve.weights import resolve_model  # noqa: E402


def ttft(url: str, prompt: list[int]) -> tuple[float, dict]:
    sample = asyncio.run(closed_loop(url, [Request(prompt, 1)], 1))[0][0]
    return sample.ttft, (sample.usage or {}).get("prompt_tokens_details") or {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8000, help="the document's length")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    document = tok.encode(" ".join(haystack(random.Random(0), args.tokens // 4)), add_special_tokens=False)[
        : args.tokens
    ]
    questions = [tok.encode(f" Question {i}: what happened at the end?", add_special_tokens=False) for i in range(3)]
    results = {}
    with tempfile.TemporaryDirectory() as disk:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "serve",
            "--port",
            str(port),
            "--dtype",
            args.dtype,
            "--kv-cache-dtype",
            args.kv_cache_dtype,
            "--max-model-len",
            str(args.tokens + 64),
            "--kv-cache-gb",
            "2",
            "--kv-cache-disk",
            disk,
            "--log-level",
            "warning",
        ]
        with server(cmd, port) as url:
            results["cold"] = ttft(url, document + questions[0])
            results["memory"] = ttft(url, document + questions[1])
        with server(cmd, port) as url:  # a new process: nothing in memory
            results["disk"] = ttft(url, document + questions[2])
    cold = results["cold"][0]
    print(
        f"\n{len(document):,}-token document + a question; --dtype {args.dtype}, --kv-cache-dtype {args.kv_cache_dtype}\n"
    )
    print("| send | TTFT | of cold | cached tokens (disk) |")
    print("|---|---|---|---|")
    for name, (seconds, details) in results.items():
        print(
            f"| {name} | {seconds * 1e3:,.0f} ms | {seconds / cold:.1%} | {details.get('cached_tokens', 0):,} ({details.get('disk_cached_tokens', 0):,}) |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({k: {"ttft_s": v[0], "details": v[1]} for k, v in results.items()}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
