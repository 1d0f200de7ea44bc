"""What the engine hands back: each request's outputs after a step, its timings and compute,
and the engine-wide counters the server's /metrics reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int
    text: str  # detokenized so far (stop strings removed)
    token_ids: list[int]  # all generated so far
    new_token_ids: list[int]  # generated in this step
    new_text: str  # text delta of this step (never a partial character, never a possible stop-string start)
    logprobs: list[dict] | None  # per generated token: {"token_id", "token", "logprob", "top": [...]}
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    measured_flops: int
    law_flops: float
    flops_by_part: dict[str, int]
    first_scheduled_time: float | None = None  # first step that computed any of it (queue time ends)
    disk_cached_prompt_tokens: int = 0  # of cached_prompt_tokens, those the disk tier loaded


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), as the
    # per-token logprobs; present once the prompt has been computed
    prompt_logprobs: list[dict | None] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    prefix_cache_queries: int  # tokens (as vLLM counts)
    prefix_cache_hits: int
    num_preemptions: int
    max_tokens_in_cache: int  # the KV cache's capacity in tokens
    kv_cache_dtype: str = "auto"  # its storage: float32, bfloat16, float16, int8
    block_size: int = 16
    num_waiting_tokens: int = 0  # prompt tokens (and recomputed ones) the waiting sequences still need
    prefill_tokens_per_s: float = 0.0  # the measured prefill rate (moving average over steps; 0: none yet)
    disk_hit_tokens: int = 0  # prefix tokens loaded from the disk tier
    disk_rejected_files: int = 0  # disk-tier files that failed verification (deleted, never served)
