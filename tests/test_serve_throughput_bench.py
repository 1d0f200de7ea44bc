"""bench/serve_throughput.py's MFU and MBU: read from a server's vLLM MFU counters."""

import math
from types import SimpleNamespace

from bench import serve_throughput as bench

METRICS = """# HELP vllm:estimated_flops_per_gpu_total Estimated number of floating point operations per GPU.
# TYPE vllm:estimated_flops_per_gpu_total counter
vllm:estimated_flops_per_gpu_total{model_name="m"} 4000000000.0
vllm:estimated_read_bytes_per_gpu_total{model_name="m"} 900
vllm:estimated_write_bytes_per_gpu_total{model_name="m"} 100
ministack:bytes_moved_total{model_name="m",part="weights"} 800
"""


def test_counters_are_read_summed_and_turned_into_mfu_and_mbu(monkeypatch):
    monkeypatch.setattr(bench.httpx, "get", lambda url, timeout: SimpleNamespace(text=METRICS))
    assert bench.mfu_counters("http://x") == {"flops": 4e9, "bytes": 1000.0}
    monkeypatch.setattr(bench.httpx, "get", lambda url, timeout: SimpleNamespace(text="vllm:num_requests_running 0\n"))
    assert bench.mfu_counters("http://x") == {}  # a server without the counters (vLLM without --enable-mfu-metrics)
    level = bench.Level("ministack", 4, 10.0, [], [], wall_s=2.0, counted={"flops": 4e9, "bytes": 6e9})
    assert bench.utilisation(level, peak_flops=1e10, bandwidth=10e9) == (0.2, 0.3)
    assert all(math.isnan(u) for u in bench.utilisation(bench.Level("vllm", 4, 10.0, [], [], wall_s=2.0), 1e10, 10e9))
