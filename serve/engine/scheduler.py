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
"""

from __future__ import annotations

import bisect
from collections import deque

from serve.engine.block_manager import BlockManager
from serve.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, policy: str = "fcfs") -> None:
        self.bm = block_manager
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
        preempted = self.num_preemptions
        while queue and budget:
            seq = queue.popleft()
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
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
        # after a preemption, admitting would only take back the blocks just freed
        admit = self.num_preemptions == preempted
        while admit and self.waiting and budget and len(self.running) < self.max_num_seqs and self.waiting[0].ready:
            seq = self.waiting[0]
            hits = self.bm.cached_prefix(seq)
            want = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            room = (self.bm.num_free - self.bm.free_blocks_taken(hits)) * self.bm.block_size
            n = min(want, room)
            if n <= 0:
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
        return scheduled

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
