"""The engine: requests in, one scheduler step at a time, tokens and text out.

`step()` asks the scheduler for a batch, runs it (model_runner), samples the sequences whose
prompt or decode completed, detokenizes, applies the stop conditions and retires finished
sequences (their blocks go back to the prefix cache). It is single-threaded by design: a
server drives it from one thread and hands requests in between steps.

Every request carries the FLOPs of the ops run on its behalf (model_runner attributes each
step's work to its sequences, recompute after preemption included) beside the law's 2*N*T;
with a ledger configured, each finished request appends one record.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from profiling.formulas.llama import DECODER_PARTS, DecoderShape
from profiling.hardware import device_peak
from profiling.ledger import Ledger, make_record
from profiling.measure import FlopCount
from profiling.parts import law_params, param_parts
from serve.config import EngineConfig, context_limit, rope_parameters
from serve.engine.block_manager import BlockManager
from serve.engine.detokenizer import Detokenizer
from serve.engine.disk_cache import DiskCache, DiskTier, fingerprint
from serve.engine.model_runner import ModelRunner, kv_bytes_per_block
from serve.engine.outputs import EngineStats, RequestError, RequestOutput, law_tokens, request_output
from serve.engine.sampler import Sampler
from serve.engine.structured import Grammars
from serve.engine.token_bytes import TokenBytes
from serve.engine.sampling_params import ParamError, SamplingParams
from serve.engine.scheduler import PrefillLimits, Scheduler
from serve.engine.sequence import Request, Sequence
from serve.engine.speculative import NgramProposer, NgramSpeculator
from serve.engine.step_cost import StepCostModel, shape_of
from serve.models import load_model
from serve.models.llama import layer_windows
from serve.weights import eos_ids, generation_defaults, model_name, resolve_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig

YARN_EXAMPLE = '{"rope_type": "yarn", "factor": 2.0}'


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoConfig

        config.validate()
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype()
        model_dir = resolve_model(config.model)
        hf_config = AutoConfig.from_pretrained(model_dir)
        self._load(config, model_dir, hf_config)
        shape = DecoderShape.from_hf(hf_config)
        num_blocks = self._size_kv_cache(config, shape)
        self._build_scheduling(config, shape, num_blocks)
        self._open_disk_tier(config, hf_config)
        self.token_bytes = TokenBytes(self.tokenizer) if self.tokenizer is not None else None
        self.sampler = Sampler(self.token_bytes.text if self.token_bytes is not None else lambda t: "")
        self._grammars = None  # serve.engine.structured.Grammars, built on the first structured request
        self.params_by_part = param_parts(self.model, DECODER_PARTS)
        self.law_params = law_params(self.params_by_part)
        self.ledger = Ledger(config.ledger) if config.ledger else None
        # the ledger's MFU: the dense peak of a GPU from the table, the CPU's measured matmul peak
        self.peak = device_peak(self.device, self.dtype) if self.ledger else None
        self.requests: dict[str, Request] = {}
        self.prefill_tokens_per_s = 0.0  # measured (_measure_prefill)
        self._next_seq_id = 0
        self._seed_rng = random.Random()

    def _load(self, config: EngineConfig, model_dir: Path, hf_config: PretrainedConfig) -> None:
        """The model, its tokenizer and generation defaults, and the context it may serve: the
        configured length checked against the model's (RoPE scaling included) and its sliding
        windows."""
        from transformers import AutoTokenizer

        rope = rope_parameters(hf_config, config.rope_scaling)
        limit = context_limit(hf_config, rope)
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context {limit} "
                f"(rope {rope.get('rope_type')}): scale RoPE with --rope-scaling (rope_scaling), e.g. " + YARN_EXAMPLE
            )
        windows = [w for w in layer_windows(hf_config) if w]
        # where every layer slides, K/V older than the widest window is never read again: released
        self.kv_window = max(windows) if windows and len(windows) == hf_config.num_hidden_layers else None
        if windows and min(windows) <= config.max_num_batched_tokens:  # serve.layers.attention relies on it
            raise ValueError(
                f"max_num_batched_tokens {config.max_num_batched_tokens} must be below the model's sliding window "
                f"{min(windows)}: a prefill chunk has to fit inside one window"
            )
        self.model_name = model_name(model_dir)
        self.half_weights = config.use_half_weights(self.dtype)
        # RoPE scaling the server adds is for the requests past the model's own context only
        native = rope_parameters(hf_config, None)
        self.native_context = (
            min(context_limit(hf_config, native), self.max_model_len)
            if config.rope_scaling and rope != native
            else None
        )
        self.model = load_model(
            model_dir,
            hf_config,
            rope,
            self.max_model_len,
            self.dtype,
            self.device,
            self.half_weights,
            native_rope=(native, self.native_context) if self.native_context else None,
        )
        has_tokenizer = any(
            (model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None
        self.eos_token_ids = eos_ids(model_dir, hf_config)
        self.sampling_defaults = generation_defaults(model_dir)

    def _size_kv_cache(self, config: EngineConfig, shape: DecoderShape) -> int:
        """Blocks the KV cache budget holds, once the weights are loaded (a fraction is of what they
        left); the served context is fitted to them."""
        self.kv_dtype = config.kv_dtype(self.dtype)
        per_block = kv_bytes_per_block(shape, config.block_size, self.kv_dtype)
        budget = config.kv_cache_budget()  # after the weights are loaded: a fraction is of what they left
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget {budget:,} bytes is less than one block ({per_block:,} bytes)")
        self.max_tokens_in_cache = num_blocks * config.block_size
        self._fit_context_to_cache(config)
        print(
            f"KV cache: {num_blocks:,} blocks x {config.block_size} tokens = {self.max_tokens_in_cache:,} tokens "
            f"({num_blocks * per_block / 2**30:.2f} GiB, {str(self.kv_dtype).removeprefix('torch.')}"
            f"{' + a scale per token and head' if self.kv_dtype == torch.int8 else ''}); "
            f"weights {'float16 storage, float32 math' if self.half_weights else str(self.dtype).removeprefix('torch.')}"
        )
        return num_blocks

    def _build_scheduling(self, config: EngineConfig, shape: DecoderShape, num_blocks: int) -> None:
        """The block manager, the scheduler with its prefill limits, the n-gram speculator and the
        model runner over `num_blocks` KV blocks."""
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, self.kv_window)
        self.step_cost = StepCostModel()  # under max_itl_ms: fitted from every step, it sizes prefill chunks
        limits = PrefillLimits(
            None if config.max_itl_ms is None else config.max_itl_ms / 1e3,
            self.step_cost,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            max_num_partial_prefills=config.max_num_partial_prefills,
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, config.scheduling_policy, limits
        )
        self.speculator = (
            NgramSpeculator(
                NgramProposer(config.num_speculative_tokens, config.prompt_lookup_max, config.prompt_lookup_min)
            )
            if config.num_speculative_tokens
            else None
        )
        self.runner = ModelRunner(
            self.model, shape, num_blocks, config.block_size, self.dtype, self.device, self.kv_dtype
        )

    def _open_disk_tier(self, config: EngineConfig, hf_config: PretrainedConfig) -> None:
        """The prefix cache's disk tier where --kv-cache-disk names one (None otherwise)."""
        self.disk = None  # the prefix cache's disk tier
        if config.kv_cache_disk is not None:
            cache = DiskCache(
                config.kv_cache_disk,
                config.kv_cache_disk_bytes,
                fingerprint(self.model_name, hf_config, self.kv_dtype, config.block_size, self.dtype),
                config.block_size,
            )
            self.disk = DiskTier(cache, self.block_manager, self.runner)
            print(
                f"KV disk tier: {config.kv_cache_disk} ({cache.bytes / 2**30:.2f} of {config.kv_cache_disk_bytes / 2**30:.2f} GiB used)"
            )

    def _fit_context_to_cache(self, config: EngineConfig) -> None:
        """A sequence of max_model_len tokens must fit the KV cache (whole, or its window under
        sliding windows), else every request left to fill the context would be refused. A
        max_model_len that was set is refused here, naming both settings; the model's own
        context is capped to what the cache holds, and said so."""
        resident = self.max_model_len
        if self.kv_window is not None:  # its window, one step's chunk and two partial blocks
            resident = min(resident, self.kv_window + config.max_num_batched_tokens + 2 * config.block_size)
        if resident <= self.max_tokens_in_cache:
            return
        if config.max_model_len is not None:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit the KV cache ({self.max_tokens_in_cache:,} tokens): "
                f"lower --max-model-len, raise --kv-cache-gb / --kv-cache-fraction, or store it smaller with --kv-cache-dtype"
            )
        print(
            f"max_model_len capped to {self.max_tokens_in_cache:,} tokens, what the KV cache holds (the model's context is "
            f"{self.max_model_len:,}: raise --kv-cache-gb / --kv-cache-fraction, or use --kv-cache-dtype int8, to serve it)"
        )
        self.max_model_len = self.max_tokens_in_cache

    # ---- requests -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a prompt (token ids). ValueError for a bad or duplicate request, or one that
        cannot fit the context or the KV cache (ParamError where one setting is to blame)."""
        vocab = self.model.lm_head.out_features
        params.validate(vocab)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.priority and self.config.scheduling_policy != "priority":
            raise ParamError(
                "priority",
                f"priority {params.priority} needs the priority scheduling policy (--scheduling-policy priority); "
                f"this engine schedules {self.config.scheduling_policy}",
            )
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(
                f"prompt token ids must be in [0, {vocab}), got {min(prompt_token_ids)}..{max(prompt_token_ids)}"
            )
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ParamError(
                "max_tokens",
                f"prompt has {len(prompt_token_ids)} tokens; this model allows at most {self.max_model_len} (max_model_len) "
                f"including max_tokens ({params.max_tokens}): shorten the prompt or lower max_tokens",
            )
        resident = total  # the most K/V it holds at once: all of it, or under sliding windows
        if self.kv_window is not None:  # its window, one step's chunk and two partial blocks
            resident = min(total, self.kv_window + self.config.max_num_batched_tokens + 2 * self.config.block_size)
        if resident > self.max_tokens_in_cache:
            raise ParamError(
                "max_tokens",
                f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the KV cache "
                f"({self.max_tokens_in_cache} tokens): lower max_tokens, or raise --kv-cache-gb (kv_cache_bytes)",
            )
        request = Request(request_id, prompt_token_ids, params)
        request.rope_scaled = self.native_context is not None and total > self.native_context
        request.bad_words_ids = self._bad_words_ids(params.bad_words)
        grammars = self.grammars() if params.structured is not None else None
        if grammars is not None:
            grammars.compile(params.structured)  # a refused spec fails here, before anything is queued
        # every sequence is built before any is queued: a request refused half-way leaves nothing behind
        first = None
        for index in range(params.n):
            seed = self._seed_rng.getrandbits(63) if params.seed is None else params.seed_of(index)
            generator = torch.Generator(self.device).manual_seed(seed)
            detok = Detokenizer(
                self.tokenizer,
                prompt_token_ids,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
            )
            seq = Sequence(self._next_seq_id + index, request, index, generator, detok, after=first)
            seq.matcher = grammars.matcher(params.structured) if grammars is not None else None
            request.seqs.append(seq)
            first = first or seq
        self._next_seq_id += params.n
        for seq in request.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = request
        if self.disk is not None:  # the n sequences share the prompt: loading it for the first serves all
            self.disk.load_prefix(first)

    def grammars(self) -> Grammars:
        """The grammar engine over this tokenizer (imported and built on first use)."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this model has none")
        if self._grammars is None:
            self._grammars = Grammars(
                self.tokenizer, self.model.lm_head.out_features, self.token_bytes, self.config.json_max_digits
            )
        return self._grammars

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (BPE spells a word differently
        inside a sentence), as vLLM tokenizes them."""
        if words and self.tokenizer is None:
            raise ParamError("bad_words", "bad_words needs a tokenizer; this model has none")
        out: list[list[int]] = []
        for word in words:
            for text in dict.fromkeys([word, word if word.startswith(" ") else " " + word]):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks (an unknown or finished id is a no-op)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self._end(request)
        self._retire(request)

    def _end(self, request: Request, error: RequestError | None = None) -> None:
        """Finish every sequence of `request` still going, as aborted (`error`: why it failed)."""
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.error = request.error or error
        request.finished_time = time.time()

    def close(self) -> None:
        """Finish what must outlive the engine: the disk tier's queued block writes."""
        if self.disk is not None:
            self.disk.cache.flush()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- stepping -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; an output for every request that got tokens or finished."""
        began = time.perf_counter()
        if self.speculator is not None:
            self.speculator.draft(self.scheduler.running)
        batch = self.scheduler.schedule()
        if self.speculator is not None:
            self.speculator.undraft_unscheduled(batch)
        if not batch:
            return []
        shape = shape_of(batch)
        scheduled = time.time()
        for seq, _ in batch:
            seq.request.first_scheduled_time = seq.request.first_scheduled_time or scheduled
        started = time.perf_counter()
        logits, sampling, verifying, prompt_spans = self.runner.execute(batch)
        self._measure_prefill(batch, time.perf_counter() - started)
        drafted = {seq.seq_id for seq, _ in verifying}
        for seq, n in batch:
            if seq.seq_id not in drafted:
                seq.num_computed_tokens += n
                self._commit(seq)
        touched: dict[str, Request] = {}
        new_tokens: dict[int, list[int]] = {}
        now = time.time()
        row = len(sampling)
        for seq, n in verifying:
            new_tokens[seq.seq_id] = self._verify(seq, n, logits[row : row + n])
            seq.request.first_token_time = seq.request.first_token_time or now
            touched[seq.request.request_id] = seq.request
            row += n
        if prompt_spans:
            self._record_prompt_logprobs(logits[row:], prompt_spans)
        for seq, draw in zip(
            sampling, self.sampler(logits[: len(sampling)], sampling, self.eos_token_ids, self._grammars)
        ):
            request = seq.request
            touched[request.request_id] = request
            if seq.is_finished:  # a sibling's failure ended it in this very step
                continue
            if draw.error is None and seq.matcher is not None and not seq.matcher.accept_token(draw.token):
                draw.error = RequestError(f"the grammar refused token {draw.token} it had allowed")
            if draw.error is not None:  # this request fails; the batch and the engine go on
                self._end(request, draw.error)
                continue
            seq.token_ids.append(draw.token)
            new_tokens[seq.seq_id] = [draw.token]
            if seq.logprobs is not None:
                seq.logprobs.append(draw.entry)
            request.first_token_time = request.first_token_time or now
            self._check_stop(seq, draw.token)
        finished = [r for r in touched.values() if r.is_finished]
        for request in finished:
            request.finished_time = request.finished_time or now
        outputs = [request_output(r, new_tokens, self.law_params) for r in touched.values()]
        for request in finished:
            self._retire(request)
        if self.config.max_itl_ms is not None:  # the whole step: what a stream waits between tokens
            self.step_cost.observe(shape, time.perf_counter() - began)
        return outputs

    def _commit(self, seq: Sequence) -> None:
        """After a step advanced seq's computed tokens: name its filled blocks (and write them to
        the disk tier), release what a sliding window left behind."""
        named = len(seq.block_hashes)
        self.block_manager.commit(seq)
        if self.disk is not None:
            self.disk.write_through(seq, named)
        self.block_manager.slide(seq)
        if seq.num_computed_tokens >= seq.num_prompt_tokens:
            seq.prompt_computed = True

    def _verify(self, seq: Sequence, n: int, logits: torch.Tensor) -> list[int]:
        """A drafted sequence's step: the tokens it yields (serve.engine.speculative), committed
        with their computed K/V, then appended one by one through the stop checks."""
        tokens = self.speculator.verify(seq, n, logits)
        seq.token_ids += tokens  # named with the kept drafts' K/V ...
        seq.num_computed_tokens += len(tokens) - 1
        self._commit(seq)
        del seq.token_ids[-len(tokens) :]  # ... then emitted as if decoded one at a time
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            self._check_stop(seq, token)
            if seq.is_finished:
                return tokens[: i + 1]
        return tokens

    def _measure_prefill(self, batch: list[tuple[Sequence, int]], seconds: float) -> None:
        """The prefill rate, tokens/s over steps that prefilled (a moving average, weight 0.2):
        what Retry-After divides the queued tokens by. A step's decodes are in its time too, as
        they are in the time the queue actually waits."""
        tokens = sum(
            n
            for seq, n in batch
            if not seq.num_drafts and not (n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens)
        )
        if tokens and seconds > 0:
            rate = tokens / seconds
            self.prefill_tokens_per_s = (
                rate if not self.prefill_tokens_per_s else 0.8 * self.prefill_tokens_per_s + 0.2 * rate
            )

    def _record_prompt_logprobs(self, logits: torch.Tensor, spans: list[tuple[Sequence, range]]) -> None:
        """Entries for the prompt tokens these rows predict (position p's row predicts token p + 1).
        Written by position, so a prompt recomputed after preemption rewrites, never appends."""
        logprobs = torch.log_softmax(logits, -1)
        row = 0
        for seq, span in spans:
            for p in span:
                seq.prompt_logprobs[p + 1] = self.sampler.logprob_entry(
                    logprobs[row], seq.token_ids[p + 1], seq.params.prompt_logprobs
                )
                row += 1

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        may_stop = len(seq.output_token_ids) >= p.min_tokens  # the sampler held EOS and stop tokens back until then
        if seq.matcher is not None and seq.matcher.is_terminated():  # the grammar is complete (it accepted EOS)
            self.scheduler.finish(seq, "stop")
        elif token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            self.scheduler.finish(seq, "stop")  # the stop token's text is not part of the output
        elif seq.detokenizer.add(token, check_stop=may_stop):
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_token_ids) >= p.max_tokens:
            self.scheduler.finish(seq, "length")

    def _retire(self, request: Request) -> None:
        """Forget a finished (or aborted) request; record its compute in the ledger."""
        self.requests.pop(request.request_id, None)
        if self.ledger is None:
            return
        generated = sum(len(seq.output_token_ids) for seq in request.seqs)
        record = make_record(
            "infer",
            FlopCount(request.flops_by_part()),
            self.params_by_part,
            tokens=law_tokens(request),
            wall_s=request.finished_time - request.arrival_time,
            peak=self.peak,
            shape=f"prompt={len(request.prompt_token_ids)},gen={generated}",
            bytes_parts=request.bytes_by_part(),
            request_id=request.request_id,
        )
        self.ledger.append(record)

    # ---- reporting and offline use --------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_usage=self.block_manager.usage,
            prefix_cache_queries=s.prefix_queries,
            prefix_cache_hits=s.prefix_hits,
            num_preemptions=s.num_preemptions,
            max_tokens_in_cache=self.max_tokens_in_cache,
            kv_cache_dtype=str(self.kv_dtype).removeprefix("torch."),
            block_size=self.config.block_size,
            num_waiting_tokens=sum(seq.num_tokens - seq.num_computed_tokens for seq in s.waiting),
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            disk_hit_tokens=self.disk.cache.hits * self.config.block_size if self.disk else 0,
            disk_rejected_files=self.disk.cache.rejected if self.disk else 0,
            spec_drafts=self.speculator.num_drafts if self.speculator else 0,
            spec_draft_tokens=self.speculator.num_draft_tokens if self.speculator else 0,
            spec_accepted_tokens=self.speculator.num_accepted_tokens if self.speculator else 0,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion (offline use); outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params_list):
            ids.append(f"generate-{self._next_seq_id}")
            self.add_request(ids[-1], prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(i not in final for i in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
