"""Prometheus metrics under the names vLLM exports, in the text exposition format.

Dashboards and alerts written for vLLM (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:time_to_first_token_seconds`, `vllm:request_time_per_output_token_seconds`, ...) work
against ministack unchanged. The exposition format is a few lines of text, so it is written
here rather than pulling in prometheus_client.

Two sources: the engine's own state and counters (running/waiting, KV usage, prefix-cache
and preemption counts) are read from `Backend.stats()` at scrape time; per-request latencies
and token counts are observed by the server as outputs stream out, the same way for every
backend. ministack adds its own compute counters: measured FLOPs and the 2NT law's.

Names vLLM has retired (`RETIRED`) are served only as vLLM serves them: behind
`--show-hidden-metrics-for-version` set to a vLLM version that still had them, so a dashboard
reading a retired name fails visibly rather than reading a name that may go at any time.

Bytes beside FLOPs, under the names vLLM's `--enable-mfu-metrics` exports
(`vllm:estimated_flops_per_gpu_total`, `vllm:estimated_read_bytes_per_gpu_total`,
`vllm:estimated_write_bytes_per_gpu_total`), so its MFU and MBU queries work unchanged: fed from
each finished request's traffic ledger (serve.engine.traffic; reads are weights and K/V read,
writes K/V written), one device, so per GPU is the whole. Both are modelled from what ran, not
read from hardware counters; the FLOPs are ministack's exact count. They grow when a request
finishes (vLLM's grow every step), so a rate over a window shorter than a request comes in lumps.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from serve.engine.outputs import EngineStats, RequestMetrics, RequestOutput

# Bucket bounds (seconds) as vLLM's, so histograms are comparable side by side.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
# request phases (queue, prefill, decode, inference) share vLLM's request-latency buckets
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


# vLLM's retired names: name -> (the vLLM minor version that hid it, the name that replaced it).
RETIRED: dict[str, tuple[tuple[int, int], str]] = {
    "vllm:gpu_cache_usage_perc": ((0, 11), "vllm:kv_cache_usage_perc"),  # deprecated in 0.9.2
    "vllm:time_per_output_token_seconds": ((0, 12), "vllm:inter_token_latency_seconds"),  # deprecated in 0.11
}


def retired_names(version: tuple[int, int] | None) -> frozenset[str]:
    """The retired names served again for `--show-hidden-metrics-for-version` (None: none): those
    vLLM `version` still served (hidden only in a later version)."""
    return frozenset(name for name, (hidden_in, _) in RETIRED.items() if version is not None and version < hidden_in)


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 bucket bounds for token counts, up to the context length."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket `le` counts values <= le)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {running}"]
        return out


PHASES = {  # vLLM's request phases: name -> help
    "queue": "Histogram of time spent in WAITING phase for request.",
    "prefill": "Histogram of time spent in PREFILL phase for request.",
    "decode": "Histogram of time spent in DECODE phase for request.",
    "inference": "Histogram of time spent in RUNNING phase for request.",
}


class ServingMetrics:
    """Request-level metrics of one served model; thread-safe observers, `render` for /metrics."""

    def __init__(
        self, model_name: str, max_model_len: int, hidden_metrics_version: tuple[int, int] | None = None
    ) -> None:
        self.labels = f'model_name="{model_name}"'
        self.retired = retired_names(hidden_metrics_version)  # retired names served again (RETIRED)
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.tpot = Histogram(ITL_BUCKETS)  # per request: its decode time over its tokens after the first (vLLM's)
        self.e2e = Histogram(E2E_BUCKETS)
        self.phases = {name: Histogram(E2E_BUCKETS) for name in PHASES}
        self.request_tokens = {name: Histogram(token_buckets(max_model_len)) for name in ("prompt", "generation")}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.measured_flops = 0
        self.law_flops = 0.0
        self.success: dict[str, int] = {}  # finish reason -> finished requests
        self.bytes_by_part: dict[str, int] = {}  # bytes moved (serve.engine.traffic's parts) by finished requests

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, tokens: int) -> None:
        """`tokens` arrived `seconds` after the previous ones: each counts as seconds/tokens apart."""
        with self._lock:
            for _ in range(tokens):
                self.itl.observe(seconds / tokens)

    def observe_finished(
        self,
        e2e_s: float,
        prompt_tokens: int,
        generation_tokens: int,
        finish_reason: str,
        measured_flops: int,
        law_flops: float,
        phases: dict[str, float] | None = None,
        tpot_s: float = 0.0,
    ) -> None:
        """A finished request; `phases`: seconds by PHASES name, those the backend timed; `tpot_s`:
        its mean time per output token after the first (0 for one token, as vLLM observes it)."""
        with self._lock:
            self.e2e.observe(e2e_s)
            self.tpot.observe(tpot_s)
            for name, seconds in (phases or {}).items():
                self.phases[name].observe(seconds)
            self.request_tokens["prompt"].observe(prompt_tokens)
            self.request_tokens["generation"].observe(generation_tokens)
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.measured_flops += measured_flops
            self.law_flops += law_flops
            self.success[finish_reason] = self.success.get(finish_reason, 0) + 1

    def observe_traffic(self, bytes_by_part: dict[str, int]) -> None:
        """A finished request's bytes moved, by traffic part (its FLOPs come with observe_finished)."""
        with self._lock:
            for part, n in bytes_by_part.items():
                self.bytes_by_part[part] = self.bytes_by_part.get(part, 0) + n

    def _traffic_lines(self, out: _Exposition) -> None:
        """vLLM's MFU counters and ministack's bytes by part (the caller holds the lock)."""
        from serve.engine.traffic import KV_READ, KV_WRITE, WEIGHTS

        lb, moved = self.labels, self.bytes_by_part
        for name, help_, value in (
            (
                "flops",
                "Estimated number of floating point operations per GPU (ministack: counted exactly).",
                self.measured_flops,
            ),
            (
                "read_bytes",
                "Estimated number of bytes read from memory per GPU.",
                moved.get(WEIGHTS, 0) + moved.get(KV_READ, 0),
            ),
            ("write_bytes", "Estimated number of bytes written to memory per GPU.", moved.get(KV_WRITE, 0)),
        ):
            out.metric(
                f"vllm:estimated_{name}_per_gpu_total",
                "counter",
                help_,
                [f"vllm:estimated_{name}_per_gpu_total{{{lb}}} {value}"],
            )
        out.metric(
            "ministack:bytes_moved_total",
            "counter",
            "Bytes the served requests moved to and from memory, modelled, by part.",
            [f'ministack:bytes_moved_total{{{lb},part="{p}"}} {moved.get(p, 0)}' for p in (WEIGHTS, KV_READ, KV_WRITE)],
        )

    def observe_aborted(self) -> None:
        """A request whose client left before its end: aborted and freed (vLLM counts these as
        request_success_total{finished_reason="abort"})."""
        with self._lock:
            self.success["abort"] = self.success.get("abort", 0) + 1

    def render(self, stats: EngineStats) -> str:
        """The text exposition of every metric, engine gauges from `stats`."""
        out = _Exposition(self.labels)
        self._engine_lines(out, stats)
        with self._lock:
            self._request_lines(out)
            self._traffic_lines(out)
        return "\n".join(out.lines) + "\n"

    def _engine_lines(self, out: _Exposition, stats: EngineStats) -> None:
        """The engine's state and counters, read at scrape time (Backend.stats)."""
        out.single("vllm:num_requests_running", "gauge", "Requests in model execution batches.", stats.num_running)
        out.single("vllm:num_requests_waiting", "gauge", "Requests waiting to be processed.", stats.num_waiting)
        out.single("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", stats.kv_usage)
        if "vllm:gpu_cache_usage_perc" in self.retired:
            out.single(
                "vllm:gpu_cache_usage_perc",
                "gauge",
                "KV-cache usage. DEPRECATED: use vllm:kv_cache_usage_perc.",
                stats.kv_usage,
            )
        info = f'{self.labels},cache_dtype="{stats.kv_cache_dtype}",block_size="{stats.block_size}",num_blocks="{stats.max_tokens_in_cache // stats.block_size}"'
        out.metric(
            "vllm:cache_config_info",
            "gauge",
            "Information of the KV cache's configuration.",
            [f"vllm:cache_config_info{{{info}}} 1"],
        )
        out.single(
            "ministack:kv_cache_capacity_tokens",
            "gauge",
            "Tokens the KV cache holds (its capacity, whatever its usage).",
            stats.max_tokens_in_cache,
        )
        out.single(
            "ministack:prefix_cache_disk_hits_total",
            "counter",
            "Prefix tokens loaded from the KV cache's disk tier.",
            stats.disk_hit_tokens,
        )
        out.single(
            "ministack:prefix_cache_disk_rejected_total",
            "counter",
            "Disk-tier block files that failed verification (never served).",
            stats.disk_rejected_files,
        )
        out.single(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        )
        out.single(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        )
        out.single(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemptions from the engine.",
            stats.num_preemptions,
        )
        out.single(
            "vllm:spec_decode_num_drafts_total",
            "counter",
            "Number of n-gram speculative proposals verified.",
            stats.spec_drafts,
        )
        out.single(
            "vllm:spec_decode_num_draft_tokens_total",
            "counter",
            "Number of draft tokens verified.",
            stats.spec_draft_tokens,
        )
        out.single(
            "vllm:spec_decode_num_accepted_tokens_total",
            "counter",
            "Number of draft tokens the model accepted.",
            stats.spec_accepted_tokens,
        )
        out.single(
            "ministack:spec_decode_acceptance_rate",
            "gauge",
            "Accepted over verified draft tokens (0 before any).",
            stats.spec_accepted_tokens / stats.spec_draft_tokens if stats.spec_draft_tokens else 0.0,
        )

    def _request_lines(self, out: _Exposition) -> None:
        """What the server observed of finished requests: tokens, outcomes, latencies, FLOPs (the caller holds the lock)."""
        lb = self.labels
        out.single("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", self.prompt_tokens)
        out.single(
            "vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", self.generation_tokens
        )
        out.metric(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [f'vllm:request_success_total{{{lb},finished_reason="{r}"}} {n}' for r, n in sorted(self.success.items())],
        )
        out.metric(
            "vllm:time_to_first_token_seconds",
            "histogram",
            "Histogram of time to first token in seconds.",
            self.ttft.lines("vllm:time_to_first_token_seconds", lb),
        )
        out.metric(
            "vllm:inter_token_latency_seconds",
            "histogram",
            "Histogram of inter-token latency in seconds.",
            self.itl.lines("vllm:inter_token_latency_seconds", lb),
        )
        if "vllm:time_per_output_token_seconds" in self.retired:
            out.metric(
                "vllm:time_per_output_token_seconds",
                "histogram",
                "Histogram of inter-token latency in seconds. DEPRECATED: use vllm:inter_token_latency_seconds.",
                self.itl.lines("vllm:time_per_output_token_seconds", lb),
            )
        out.metric(
            "vllm:request_time_per_output_token_seconds",
            "histogram",
            "Histogram of time_per_output_token_seconds per request.",
            self.tpot.lines("vllm:request_time_per_output_token_seconds", lb),
        )
        out.metric(
            "vllm:e2e_request_latency_seconds",
            "histogram",
            "Histogram of end to end request latency in seconds.",
            self.e2e.lines("vllm:e2e_request_latency_seconds", lb),
        )
        for name, help_ in PHASES.items():
            out.metric(
                f"vllm:request_{name}_time_seconds",
                "histogram",
                help_,
                self.phases[name].lines(f"vllm:request_{name}_time_seconds", lb),
            )
        for name in ("prompt", "generation"):
            out.metric(
                f"vllm:request_{name}_tokens",
                "histogram",
                f"Number of {name} tokens processed.",
                self.request_tokens[name].lines(f"vllm:request_{name}_tokens", lb),
            )
        out.single(
            "ministack:measured_flops_total",
            "counter",
            "FLOPs the served requests cost, counted exactly.",
            self.measured_flops,
        )
        out.single(
            "ministack:law_flops_total", "counter", "FLOPs the 2NT law charges the served requests.", self.law_flops
        )


class _Exposition:
    """Prometheus text lines being written: each metric's HELP and TYPE, then its samples."""

    def __init__(self, labels: str) -> None:
        self.labels = labels
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: list[str]) -> None:
        self.lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

    def single(self, name: str, kind: str, help_: str, value: object) -> None:
        """One sample with the model's labels."""
        self.metric(name, kind, help_, [f"{name}{{{self.labels}}} {value}"])


def request_phases(m: RequestMetrics) -> dict[str, float]:
    """vLLM's request phases from the engine's timestamps (those it has): queue (arrival to
    first scheduled), prefill (to the first token), decode (to the end), inference (both)."""
    if m.first_scheduled_time is None or m.first_token_time is None or m.finished_time is None:
        return {}
    return {
        "queue": m.first_scheduled_time - m.arrival_time,
        "prefill": m.first_token_time - m.first_scheduled_time,
        "decode": m.finished_time - m.first_token_time,
        "inference": m.finished_time - m.first_scheduled_time,
    }


async def observed(
    metrics: ServingMetrics, outputs: AsyncGenerator[RequestOutput, None], arrival: float
) -> AsyncIterator[RequestOutput]:
    """A backend's stream, timing its tokens into `metrics` (`arrival`: when it was submitted,
    time.perf_counter); closed with it. A stream closed before its end (the client left) is
    counted as aborted."""
    first = last = None
    finished = False
    async with aclosing(outputs):
        try:
            async for output in outputs:
                now = time.perf_counter()
                new = max(len(c.new_token_ids) for c in output.outputs)
                if new:
                    if last is None:
                        first = now
                        metrics.observe_first_token(now - arrival)
                    else:
                        metrics.observe_inter_token(now - last, new)
                    last = now
                if output.finished:
                    finished, m = True, output.metrics
                    reason = next((c.finish_reason for c in output.outputs if c.finish_reason), "stop")
                    longest = max(len(c.token_ids) for c in output.outputs)  # n sequences decode side by side
                    tpot = (last - first) / (longest - 1) if first is not None and longest > 1 else 0.0
                    metrics.observe_finished(
                        now - arrival,
                        len(output.prompt_token_ids),
                        sum(len(c.token_ids) for c in output.outputs),
                        reason,
                        m.measured_flops,
                        m.law_flops,
                        request_phases(m),
                        tpot,
                    )
                    metrics.observe_traffic(m.bytes_by_part)
                yield output
        except (
            GeneratorExit,
            asyncio.CancelledError,
        ):  # the client left; closing the backend's stream aborts the request
            if not finished:
                metrics.observe_aborted()
            raise
