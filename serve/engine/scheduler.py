"""Which sequences run in the next step, and how many of their tokens.

One step mixes decodes and prefill chunks under a token budget (`max_num_batched_tokens`):

1. running sequences that decode (one token each) are scheduled first, so a long prompt
   arriving never stalls the streams already flowing;
2. then running sequences part-way through a prefill, each taking the next chunk the budget
   allows (chunked prefill);
3. then waiting sequences, first come first served, while the budget, `max_num_seqs` and
   free blocks allow; their prefix-cache hits are taken first and cost no budget.

When a running sequence needs a block and none is free, the lowest-priority sequence not
yet scheduled this step is preempted by recompute: the last in the order above, i.e. a
part-prefilled sequence before any decode, the latest admitted first (or, if none is left,
the sequence itself). Its blocks are released and it returns to the front of the waiting
queue with all its tokens, prompt and generated, to be prefilled again (its full blocks
usually still sit in the prefix cache). Nothing is lost: only the K/V is dropped.

Under the "priority" policy (vLLM's) every order above is by each request's `priority`
(lower first), then by arrival: running sequences are scheduled highest priority first
(a decode does not go before a higher-priority prefill), the victim of a preemption is the
lowest-priority one, and waiting requests are admitted in priority order. A waiting request
does not preempt running ones to get in (as in vLLM): it takes the next free slot.

Prefill limits (PrefillLimits, all off by default): under `max_itl_s`, while any sequence
decodes, the step's prefill tokens are capped so that the step's predicted time (step_cost,
fitted from measured steps) stays under the target, never below `min_prefill_tokens` so a long
prompt always progresses; with nothing decoding a step prefills with the whole token budget.
vLLM's `long_prefill_token_threshold` caps a longer prompt at that many tokens a step, and
`max_num_partial_prefills` is how many prompts may be part-way prefilled at once; the step's
prefill budget is shared evenly among up to that many prompts, so a short prompt arriving
behind a long one starts in the next step rather than after it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from serve.engine.block_manager import BlockManager
from serve.engine.sequence import Sequence, Status
from serve.engine.step_cost import StepCostModel, is_prefill

MIN_PREFILL_TOKENS = 32  # the floor under the ITL cap: a long prompt progresses in every step


@dataclass
class PrefillLimits:
    """How much prefill a step takes beside running decodes (EngineConfig's fields of the
    same names; docs/serving.md). The defaults are no limit beyond the token budget."""

    max_itl_s: float | None = None  # while any sequence decodes: the predicted step time's target
    cost: StepCostModel = field(default_factory=StepCostModel)  # predicts it (fitted by the engine)
    min_prefill_tokens: int = MIN_PREFILL_TOKENS
    long_prefill_token_threshold: int = 0  # > 0: a prompt longer than this takes at most this per step
    max_num_partial_prefills: int = 1  # prompts part-way prefilled at once


@dataclass
class ChunkLimits:
    """One step's prefill accounting: what is left of its prefill budget, each prompt's share
    of it, and how many prompts are part-way."""

    left: int  # prefill tokens the step may still take
    share: int  # the most one prompt takes: the budget over the prompts sharing it
    threshold: int  # long_prefill_token_threshold (0: off)
    max_part_way: int
    part_way: int  # prompts part-way: running ones not done by this step's chunks, admitted ones too

    def cap(self, seq: Sequence, want: int, remaining: int | None = None) -> int:
        """`want` tokens of seq's prompt (`remaining` left of it, default all it has left) cut to
        what the step's prefill limits allow."""
        remaining = seq.num_tokens - seq.num_computed_tokens if remaining is None else remaining
        if 0 < self.threshold < remaining:
            want = min(want, self.threshold)
        return max(0, min(want, self.left, self.share))

    def may_leave_part_way(self) -> bool:
        """Whether one more prompt may end the step part-way prefilled."""
        return self.part_way < self.max_part_way

    def take(self, n: int, was_part_way: bool, completes: bool) -> None:
        """A prompt got n tokens this step: it was part-way before or not, its chunk completes it or not."""
        self.left -= n
        self.part_way += int(not completes) - int(was_part_way)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        limits: PrefillLimits | None = None,
    ) -> None:
        self.bm = block_manager
        self.limits = limits or PrefillLimits()
        self.by_priority = policy == "priority"
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            self._insert_waiting(seq)
        else:
            self.waiting.append(seq)

    def _insert_waiting(self, seq: Sequence) -> None:
        """Into the waiting queue at its place by (priority, arrival)."""
        at = bisect.bisect_right([_rank(s) for s in self.waiting], _rank(seq))
        self.waiting.insert(at, seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens) pairs for the next step, decodes first."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        queue = deque(sorted(decodes + prefills, key=_rank) if self.by_priority else decodes + prefills)
        chunks = self._chunk_limits()
        preempted = self.num_preemptions
        while queue and budget:
            seq = queue.popleft()
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            prefill = is_prefill(seq)
            if prefill and (want := chunks.cap(seq, want)) == 0:
                continue  # the step's prefill budget is spent; decodes may still follow
            while (n := min(want, self.bm.room(seq))) == 0:
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            if n == 0:
                break
            self.bm.reserve(seq, n)
            scheduled.append((seq, n))
            budget -= n
            if prefill:
                chunks.take(n, was_part_way=True, completes=n >= seq.num_tokens - seq.num_computed_tokens)
        # after a preemption, admitting would only take back the blocks just freed
        if self.num_preemptions == preempted:
            self._admit(scheduled, budget, chunks)
        return scheduled

    def _admit(self, scheduled: list[tuple[Sequence, int]], budget: int, chunks: ChunkLimits) -> None:
        """Waiting sequences into the step, in queue order, while the budget, `max_num_seqs`, the
        free blocks and the prefill limits allow; their prefix-cache hits cost no budget."""
        while self.waiting and budget and len(self.running) < self.max_num_seqs and self.waiting[0].ready:
            seq = self.waiting[0]
            hits = self.bm.cached_prefix(seq)
            remaining = seq.num_tokens - len(hits) * self.bm.block_size
            want = chunks.cap(seq, min(remaining, budget), remaining)
            room = (self.bm.num_free - self.bm.free_blocks_taken(hits)) * self.bm.block_size
            n = min(want, room)
            if n <= 0 or (n < remaining and not chunks.may_leave_part_way()):
                break
            self.waiting.popleft()
            self.bm.use_prefix(seq, hits)
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
            if not seq.admitted:
                seq.num_cached_tokens, seq.admitted = seq.num_computed_tokens, True
            self.bm.reserve(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            chunks.take(n, was_part_way=False, completes=n >= remaining)

    def _chunk_limits(self) -> ChunkLimits:
        """This step's prefill limits: the ITL budget while any sequence decodes (else the
        whole token budget), shared by up to max_num_partial_prefills prompts."""
        limits = self.limits
        decoding = [s for s in self.running if not is_prefill(s)]
        prefilling = [s for s in self.running if is_prefill(s)]
        total = self.max_num_batched_tokens
        if limits.max_itl_s is not None and decoding:
            decode_tokens = sum(s.num_tokens - s.num_computed_tokens for s in decoding)
            past = max((s.num_computed_tokens for s in prefilling), default=0)
            fitted = limits.cost.prefill_budget(limits.max_itl_s, decode_tokens, past)
            total = min(total, max(limits.min_prefill_tokens, fitted))
        sharing = min(limits.max_num_partial_prefills, len(prefilling) + len(self.waiting)) or 1
        return ChunkLimits(
            total,
            total // sharing,
            limits.long_prefill_token_threshold,
            limits.max_num_partial_prefills,
            part_way=len(prefilling),
        )

    def preempt(self, seq: Sequence) -> None:
        """Drop seq's K/V and requeue it at the front; it will be prefilled again."""
        self.running.remove(seq)
        self.bm.release(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        if self.by_priority:
            self._insert_waiting(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq (finished or aborted) and release its blocks into the prefix cache."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.bm.release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason


def _rank(seq: Sequence) -> tuple[int, float, int]:
    """The priority policy's order: priority (lower first), arrival, then the sequence's index."""
    return seq.request.params.priority, seq.request.arrival_time, seq.seq_id
