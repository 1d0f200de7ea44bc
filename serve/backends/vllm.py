"""`--engine vllm`: vLLM's AsyncLLM behind the same Backend protocol as ministack's engine.

The server, its metrics and its usage blocks are the same for both engines, so the two can be
compared request for request. vLLM does not count FLOPs, so this backend charges each request
the exact decoder formula (profiling.formulas.llama): one prefill of the uncached prompt
tokens over the cached ones, then one single-token decode step per further generated token,
and writes the same ledger record our engine does.

vLLM streams cumulative outputs (all text and tokens so far); they are turned into our
RequestOutput, whose deltas (new_token_ids, new_text) are the difference to the previous one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator

from vllm import SamplingParams as VllmSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from profiling.formulas.llama import DECODER_PARTS, DecoderShape, decoder_flops
from profiling.hardware import device_peak
from profiling.ledger import Ledger, make_record
from profiling.measure import FlopCount
from profiling.parts import merge, param_parts
from serve.async_engine import Overloaded
from serve.weights import generation_defaults
from serve.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from serve.engine.sampling_params import SamplingParams
from serve.weights import model_name, resolve_model


class VllmBackend:
    """vLLM's async engine (its CPU or CUDA build) serving a transformers directory."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        kv_cache_fraction: float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_queue: int = 256,
        ledger: str | None = None,
        tensor_parallel_size: int = 1,
        scheduling_policy: str = "fcfs",
        speculative_config: dict | None = None,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        args = AsyncEngineArgs(
            model=str(path),
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_memory_bytes=kv_cache_bytes,
            enable_prefix_caching=True,
            disable_log_stats=True,
            scheduling_policy=scheduling_policy,
            speculative_config=speculative_config,
        )
        if kv_cache_fraction is not None:
            args.gpu_memory_utilization = kv_cache_fraction
        self._stats = _StatsKeeper()
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[lambda config, index: self._stats])
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model_name = model_name(path)  # the name our engine serves it under
        self.max_model_len = self.engine.model_config.max_model_len
        self.sampling_defaults = generation_defaults(path)  # the same file vLLM's --generation-config auto reads
        self.max_queue = max_queue

        config = AutoConfig.from_pretrained(path)
        self.shape = DecoderShape.from_hf(config)
        with torch.device("meta"):
            self.params = param_parts(AutoModelForCausalLM.from_config(config), DECODER_PARTS)
        self.dtype = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.peak = device_peak("cuda" if torch.cuda.is_available() else "cpu", self.dtype)
        self.ledger = Ledger(ledger) if ledger else None

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        waiting = self._stats.latest.num_waiting
        if waiting >= self.max_queue:  # the scheduler's count as of its last step
            raise Overloaded(f"{waiting} requests are already waiting (--max-queue {self.max_queue})")
        return self._stream(request_id, prompt_ids, params)

    def check_structured(self, structured) -> None:
        raise ValueError(
            "structured outputs are not passed on to vLLM's engine by this server (--engine ministack has them)"
        )

    async def _stream(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        vllm_params = VllmSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            seed=params.seed,
            stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None,
            ignore_eos=params.ignore_eos,
            max_tokens=params.max_tokens,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            min_p=params.min_p,
            min_tokens=params.min_tokens,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=params.logit_bias or None,
            allowed_token_ids=params.allowed_token_ids,
            bad_words=params.bad_words or None,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
        )
        arrival = time.time()
        first_token_time = None
        previous: dict[int, CompletionOutput] = {}
        stream = self.engine.generate(
            {"prompt_token_ids": prompt_ids}, vllm_params, request_id, priority=params.priority
        )
        try:
            async for out in stream:
                outputs = [self._delta(c, previous.get(c.index)) for c in out.outputs]
                previous.update((c.index, c) for c in outputs)
                if first_token_time is None and any(c.new_token_ids for c in outputs):
                    first_token_time = time.time()
                metrics = RequestMetrics(
                    arrival_time=arrival,
                    first_token_time=first_token_time,
                    finished_time=time.time() if out.finished else None,
                    prompt_tokens=len(prompt_ids),
                    cached_prompt_tokens=out.num_cached_tokens or 0,
                    generated_tokens=sum(len(c.token_ids) for c in outputs),
                    measured_flops=0,
                    law_flops=0.0,
                    flops_by_part={},
                )
                if out.finished:
                    self._account(request_id, metrics, [len(c.token_ids) for c in outputs])
                prompt_logprobs = None
                if out.prompt_logprobs is not None:  # vLLM's: None, then one {token_id: Logprob} per position
                    prompt_logprobs = [None] + [
                        self._logprob_entry(t, pos) for t, pos in zip(prompt_ids[1:], out.prompt_logprobs[1:])
                    ]
                yield RequestOutput(request_id, list(prompt_ids), outputs, out.finished, metrics, prompt_logprobs)
        finally:  # closing vLLM's stream early aborts the request there
            await stream.aclose()

    def _delta(self, c, before: CompletionOutput | None) -> CompletionOutput:
        """Our CompletionOutput from vLLM's cumulative one."""
        token_ids = list(c.token_ids)
        done = len(before.token_ids) if before else 0
        text_done = len(before.text) if before else 0
        logprobs = None
        if c.logprobs is not None:
            logprobs = [self._logprob_entry(token_ids[i], c.logprobs[i]) for i in range(len(token_ids))]
        return CompletionOutput(
            index=c.index,
            text=c.text,
            token_ids=token_ids,
            new_token_ids=token_ids[done:],
            new_text=c.text[text_done:],
            logprobs=logprobs,
            finish_reason=c.finish_reason,
        )

    def _logprob_entry(self, token_id: int, position: dict) -> dict:
        """vLLM's {token_id: Logprob(logprob, rank, decoded_token)} -> our per-token dict."""
        chosen = position[token_id]
        top = sorted((lp.rank, tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank > 0)
        return {
            "token_id": token_id,
            "token": chosen.decoded_token or "",
            "logprob": chosen.logprob,
            "top": [{"token_id": tid, "token": lp.decoded_token or "", "logprob": lp.logprob} for _, tid, lp in top],
        }

    def _account(self, request_id: str, metrics: RequestMetrics, generated: list[int]) -> None:
        """Fill the request's FLOPs from the exact formula (and append its ledger record)."""
        prompt, cached = metrics.prompt_tokens, metrics.cached_prompt_tokens
        steps = [decoder_flops(self.shape, q_len=prompt - cached, past_len=cached, logits=1)]
        for tokens in generated:  # each completion decodes its tokens after the first one by one
            steps += [decoder_flops(self.shape, q_len=1, past_len=prompt + i, logits=1) for i in range(tokens - 1)]
        count = FlopCount(merge(steps))
        tokens = prompt + sum(generated)
        record = make_record(
            "infer",
            count,
            self.params,
            tokens,
            metrics.finished_time - metrics.arrival_time,
            self.peak,
            f"prompt={prompt},gen={sum(generated)}",
            run="vllm",
            request_id=request_id,
        )
        metrics.measured_flops, metrics.law_flops, metrics.flops_by_part = (
            count.total,
            record.law_flops,
            dict(count.by_part),
        )
        if self.ledger is not None:
            self.ledger.append(record)

    def healthy(self) -> bool:
        return not self.engine.errored

    def stats(self) -> EngineStats:
        return self._stats.latest


class _StatsKeeper(StatLoggerBase):
    """A vLLM stat logger that keeps the latest scheduler snapshot and sums the counters."""

    def __init__(self, vllm_config=None, engine_index: int = 0) -> None:
        self.latest = EngineStats(
            num_running=0,
            num_waiting=0,
            kv_usage=0.0,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_preemptions=0,
            max_tokens_in_cache=0,
        )

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        """Called by vLLM after each engine step (on the event loop): replace, never mutate, the snapshot."""
        s = self.latest
        if scheduler_stats is not None:
            prefix = scheduler_stats.prefix_cache_stats
            s = dataclasses.replace(
                s,
                num_running=scheduler_stats.num_running_reqs,
                num_waiting=scheduler_stats.num_waiting_reqs,
                kv_usage=scheduler_stats.kv_cache_usage,
                prefix_cache_queries=s.prefix_cache_queries + prefix.queries,
                prefix_cache_hits=s.prefix_cache_hits + prefix.hits,
            )
        if iteration_stats is not None:
            s = dataclasses.replace(s, num_preemptions=s.num_preemptions + iteration_stats.num_preempted_reqs)
        self.latest = s

    def log_engine_initialized(self) -> None:
        pass
