"""What the engine hands back: each request's outputs after a step, its timings and compute,
and the engine-wide counters the server's /metrics reads; and how a request's state becomes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from profiling.laws import infer_flops
from serve.engine.sequence import Request


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
    bytes_by_part: dict[str, int] = field(
        default_factory=dict
    )  # bytes its steps moved (serve.engine.traffic), modelled


@dataclass(frozen=True)
class RequestError:
    """Why the engine ended a request early. `invalid`: its own settings leave it nothing to
    generate (the server answers 400); else a fault on the engine's side (500)."""

    message: str
    invalid: bool = False


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
    error: RequestError | None = None  # the request failed (finished, every completion "abort"): why


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
    spec_drafts: int = 0  # n-gram speculative proposals verified (serve.engine.speculative)
    spec_draft_tokens: int = 0  # their draft tokens
    spec_accepted_tokens: int = 0  # of which the model agreed with (acceptance rate: accepted / draft tokens)


def request_output(request: Request, new_tokens: dict[int, list[int]], law_params: int) -> RequestOutput:
    """The request's output after a step: every completion so far, this step's new tokens and
    text, its metrics (2NT with N = `law_params`)."""
    completions = [
        CompletionOutput(
            index=seq.index,
            text=seq.detokenizer.text,
            token_ids=seq.output_token_ids,
            new_token_ids=new_tokens.get(seq.seq_id, []),
            new_text=seq.detokenizer.delta(final=seq.is_finished),
            logprobs=list(seq.logprobs)
            if seq.logprobs is not None
            else None,  # a snapshot: the engine thread appends on
            finish_reason=seq.finish_reason,
        )
        for seq in request.seqs
    ]
    first = request.seqs[0]
    prompt_logprobs = (
        list(first.prompt_logprobs) if first.prompt_logprobs is not None and first.prompt_computed else None
    )
    return RequestOutput(
        request.request_id,
        request.prompt_token_ids,
        completions,
        request.is_finished,
        request_metrics(request, law_params),
        prompt_logprobs,
        request.error,
    )


def request_metrics(request: Request, law_params: int) -> RequestMetrics:
    by_part = request.flops_by_part()
    generated = sum(len(seq.output_token_ids) for seq in request.seqs)
    return RequestMetrics(
        arrival_time=request.arrival_time,
        first_token_time=request.first_token_time,
        first_scheduled_time=request.first_scheduled_time,
        finished_time=request.finished_time,
        prompt_tokens=len(request.prompt_token_ids),
        cached_prompt_tokens=request.seqs[0].num_cached_tokens,
        disk_cached_prompt_tokens=min(request.seqs[0].num_disk_tokens, request.seqs[0].num_cached_tokens),
        generated_tokens=generated,
        measured_flops=sum(by_part.values()),
        law_flops=infer_flops(law_params, law_tokens(request)),
        flops_by_part=by_part,
        bytes_by_part=request.bytes_by_part(),
    )


def law_tokens(request: Request) -> int:
    """T of the law's 2NT: the prompt once plus every generated token."""
    return len(request.prompt_token_ids) + sum(len(seq.output_token_ids) for seq in request.seqs)
