"""A sequence (one completion being generated) and a request (a prompt and its n sequences).

A sequence's state is its token ids (prompt, then generated) and how many of them have K/V
in the cache (`num_computed_tokens`). The scheduler only ever compares the two: fewer
computed than held means prefill work remains (a prompt, its next chunk, or everything again
after preemption); exactly one fewer means the sequence decodes. So chunked prefill,
prefix-cache hits and recompute after preemption are all the same state, at different counts.
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict

import torch

from serve.engine.detokenizer import Detokenizer
from serve.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request: Request,
        index: int,
        generator: torch.Generator,
        detokenizer: Detokenizer,
        after: Sequence | None = None,
    ) -> None:
        self.seq_id, self.request, self.index = seq_id, request, index
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.admitted = False
        self.block_table: list[int] = []  # cache blocks holding this sequence's K/V, in order
        self.block_hashes: list[int] = []  # hashes of the leading full blocks of block_table
        self.disk_keys: list[str] = []  # the disk tier's keys of its leading full blocks (serve.engine.disk_cache)
        self.num_disk_tokens = 0  # prompt tokens the disk tier loaded for it
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator = generator
        self.detokenizer = detokenizer
        self.logprobs: list[dict] | None = [] if request.params.logprobs is not None else None
        # the prompt's own logprobs, one entry per prompt position (the first has none), computed
        # by the request's first sequence only: its siblings share the prompt
        wants = request.params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[dict | None] | None = [None] * self.num_prompt_tokens if wants else None
        self.matcher = (
            None  # the grammar matcher of a structured output (serve.engine.structured), its own per sequence
        )
        self.flops: dict[str, int] = defaultdict(int)  # FLOPs of the ops run for this sequence, by part
        self.bytes: dict[str, int] = defaultdict(int)  # bytes its steps moved, by part (serve.engine.traffic)
        self.num_drafts = (
            0  # speculative tokens at the end of token_ids, awaiting verification (serve.engine.speculative)
        )
        # n > 1: a sibling waits until the first sequence's prompt is cached, then shares its blocks
        self.after = after
        self.prompt_computed = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def cache_root(self) -> str | None:
        """The parent of its first block's hash: K/V rotated by scaled RoPE is another cache's."""
        return "rope-scaled" if self.request.rope_scaled else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def ready(self) -> bool:
        """May be scheduled: no sibling to wait for, or the sibling's prompt is in the cache."""
        return self.after is None or self.after.prompt_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def computes_prompt_logprobs(self) -> bool:
        """Its prompt is (re)computed with logits at every position: until the prompt is done
        once, nothing of it may come from the prefix cache."""
        return self.prompt_logprobs is not None and not self.prompt_computed


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.bad_words_ids: list[list[int]] = []  # params.bad_words as token sequences (LLMEngine.add_request)
        self.rope_scaled = False  # rotated by the server's --rope-scaling (it needs more than the native context)
        self.arrival_time = time.time()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.error = None  # serve.engine.outputs.RequestError: why it failed (its sequences end as "abort")
        self.seqs: list[Sequence] = []

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def flops_by_part(self) -> dict[str, int]:
        return _sum_parts(seq.flops for seq in self.seqs)

    def bytes_by_part(self) -> dict[str, int]:
        return _sum_parts(seq.bytes for seq in self.seqs)


def _sum_parts(counts) -> dict[str, int]:
    """Per-part totals over the sequences' counters, zero parts left out."""
    total: dict[str, int] = defaultdict(int)
    for count in counts:
        for part, n in count.items():
            total[part] += n
    return {part: n for part, n in total.items() if n}
