"""A short soak of `ministack serve` (bench/soak.py's, ~30 s): a few clients of mixed, partly
hostile traffic plus bursts past the queue cap against the server as users start it (a
subprocess on 127.0.0.1), over the tiny random Llama the other serve tests use.

Asserted as in the long run: no 5xx, every request answered as its kind expects and none hung,
the running / waiting gauges and the KV usage back to 0 afterwards, /health under 1 s all along.
Memory is asserted with a looser bound than the long run's 5 %: the tiny model's server is
mostly torch and tokenizer code (a few hundred MB), and in 30 s it still meets batch sizes and
shapes for the first time, whose allocator arenas and caches stay resident; growth that
persists over minutes is what bench/soak.py measures.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.soak import HUNG, Options, free_port, goals, report, soak, started_server  # noqa: E402
from test_serve_api import smollm2, tiny_model  # noqa: E402, F401  (fixtures)


@pytest.mark.slow
def test_a_short_soak_meets_every_goal(tiny_model):  # noqa: F811
    port = free_port()
    flags = ["--max-model-len", "256", "--kv-cache-gb", "0.01", "--max-num-seqs", "8"]
    with started_server(port, max_queue=8, model=str(tiny_model), extra=flags) as proc:
        options = Options(
            url=f"http://127.0.0.1:{port}",
            clients=4,
            seconds=20,
            warmup_seconds=4,
            max_queue=8,
            burst_every=5,
            request_timeout=60,
            idle_timeout=20,
            rss_tolerance=0.25,
            pid=proc.pid,
            settle_seconds=6,
        )
        result = asyncio.run(soak(options))
    print(report(result))
    kinds = {o.kind.name for o in result.outcomes}
    assert {"chat_stream", "json_schema", "cancel", "overlong", "malformed", "wrong_type", "burst"} <= kinds
    assert any(o.status == 429 for o in result.outcomes), "the bursts never went past the queue cap"
    assert not [o for o in result.outcomes if o.status == HUNG]
    failed = [g for g in goals(result) if g.passed is not True]
    assert not failed, report(result)
