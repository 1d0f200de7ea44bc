"""Block manager and scheduler on their own (no model): allocation, reference counts, prefix
hashes, LRU eviction, sliding-window release, the decode-first token budget, chunking and
preemption order."""

from __future__ import annotations

import torch

from serve.engine.block_manager import FREED, BlockManager
from serve.engine.detokenizer import Detokenizer
from serve.engine.sampling_params import SamplingParams
from serve.engine.scheduler import Scheduler
from serve.engine.sequence import Request, Sequence, Status

BS = 4


def seq(tokens: list[int], seq_id: int = 0, priority: int = 0) -> Sequence:
    request = Request(f"r{seq_id}", tokens, SamplingParams(priority=priority))
    return Sequence(seq_id, request, 0, torch.Generator(), Detokenizer(None, tokens, []))


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What a step does to a sequence's bookkeeping: reserve, run, commit."""
    bm.reserve(s, n)
    s.num_computed_tokens += n
    bm.commit(s)


def test_reserve_release_and_room():
    bm = BlockManager(num_blocks=4, block_size=BS)
    s = seq(list(range(10)))
    assert bm.room(s) == 16
    compute(bm, s, 10)
    assert len(s.block_table) == 3 and bm.num_free == 1
    assert bm.room(s) == 2 + 4  # the rest of its last block plus the free one
    bm.release(s)
    assert bm.num_free == 4 and s.block_table == []


def test_prefix_hit_shares_full_blocks_and_counts_references():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(list(range(10)), 0)
    compute(bm, a, 10)
    b = seq(list(range(8)) + [99, 98, 97], 1)
    hits = bm.cached_prefix(b)
    assert hits == a.block_table[:2]  # two full blocks in common; a's partial third is not named
    bm.use_prefix(b, hits)
    assert b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.release(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]


def test_a_full_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq(list(range(8)))
    compute(bm, a, 8)
    assert len(bm.cached_prefix(seq(list(range(8)), 1))) == 1  # 7 tokens may come from cache: one block


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = seq(list(range(9)), 0)  # blocks [0..3], [4..7] full, [8] partial
    compute(bm, a, 9)
    bm.release(a)  # freed tail first: the partial block is reused before the prefix
    assert bm.num_free == 3
    again = seq(list(range(9)), 1)
    assert len(bm.cached_prefix(again)) == 2
    other = seq([50, 51, 52, 53, 54], 2)
    compute(bm, other, 5)  # needs two blocks: the partial one, then the LRU cached one (tokens 4..7)
    assert len(bm.cached_prefix(again)) == 1  # [0..3] survives, [4..7] was evicted
    assert bm.blocks[bm.cached_prefix(again)[0]].token_ids == (0, 1, 2, 3)


def test_a_sliding_window_holds_only_the_blocks_inside_it():
    """Window 6, blocks of 4: after 17 tokens the next query (position 17) sees keys 12..17, so
    blocks 0-2 (positions 0-11) are released; a later prefix hit of 16 tokens (its next query
    sees keys 11..16) names blocks 0-1 without holding them."""
    bm = BlockManager(num_blocks=8, block_size=BS, window=6)
    a = seq(list(range(30)))
    compute(bm, a, 17)
    bm.slide(a)
    assert a.block_table[:3] == [FREED] * 3 and FREED not in a.block_table[3:]
    assert bm.num_free == 8 - 2  # its last two blocks
    bm.release(a)  # skips the FREED entries
    assert bm.num_free == 8
    b = seq(list(range(30)), seq_id=1)
    hits = bm.cached_prefix(b)
    assert len(hits) == 4  # positions 0-15 still cached under their hashes
    assert bm.free_blocks_taken(hits) == 2  # blocks 2-3 (positions 8-15) reach into b's window
    bm.use_prefix(b, hits)
    assert b.num_computed_tokens == 16 and b.block_table == [FREED] * 2 + hits[2:]
    assert bm.num_free == 8 - 2


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    a = seq(list(range(9)))
    compute(bm, a, 9)
    assert bm.cached_prefix(seq(list(range(9)), 1)) == []


def run(sched: Scheduler) -> list[tuple[Sequence, int]]:
    """One scheduled step with the model's work faked: advance, commit, 'sample' token 7."""
    batch = sched.schedule()
    for s, n in batch:
        s.num_computed_tokens += n
        sched.bm.commit(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
    return batch


def test_decodes_first_then_prefill_chunks_within_the_budget():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=6)
    a, b, c = seq([1, 2], 0), seq(list(range(10, 30)), 1), seq(list(range(40, 44)), 2)
    sched.add(a)
    run(sched)  # a prefills, samples
    sched.add(b)
    sched.add(c)
    batch = run(sched)
    assert [(s.seq_id, n) for s, n in batch] == [(0, 1), (1, 5)]  # a's decode, then b's first chunk
    batch = run(sched)
    assert [(s.seq_id, n) for s, n in batch] == [(0, 1), (1, 5)]  # b continues before c is admitted
    for _ in range(3):
        batch = run(sched)
    assert [(s.seq_id, n) for s, n in batch] == [(0, 1), (1, 1), (2, 4)]  # b decodes, c prefills


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq([1, 2, 3], i))
    assert [s.seq_id for s, _ in run(sched)] == [0, 1]
    assert len(sched.waiting) == 1


def test_preemption_takes_the_last_admitted_and_requeues_it_first():
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq([1, 2, 3, 4, 5, 6], 0), seq([9, 8, 7, 6, 5, 4], 1)
    sched.add(a)
    sched.add(b)
    run(sched)  # both prefill 6 tokens into 2 blocks each (no block left free), sample a 7th
    run(sched)
    run(sched)  # both decode into their last two slots: 8 tokens cached, a 9th sampled
    batch = run(sched)  # a needs a third block: b (admitted last) is preempted, keeping its tokens
    assert [(s.seq_id, n) for s, n in batch] == [(0, 1)]
    assert sched.num_preemptions == 1
    assert b.status is Status.WAITING and sched.waiting[0] is b
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_tokens == 9


def test_priority_policy_admits_by_priority_and_preempts_the_lowest():
    """vLLM's priority policy: waiting requests admitted lowest `priority` value first (ties by
    arrival), running ones scheduled in that order, and the victim of a preemption is the
    lowest-priority sequence, even when it was admitted first; it requeues at its own rank."""
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=2, max_num_batched_tokens=100, policy="priority")
    low, high, mid = (
        seq([1, 2, 3, 4, 5, 6], 0, priority=5),
        seq([9, 8, 7, 6, 5, 4], 1, priority=0),
        seq([3, 3, 3], 2, priority=1),
    )
    for s in (low, high, mid):
        sched.add(s)
    assert list(sched.waiting) == [high, mid, low]
    assert [s.seq_id for s, _ in run(sched)] == [1, 2]  # two slots: high, then mid; low waits

    sched = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=100, policy="priority")
    low, high = seq([1, 2, 3, 4, 5, 6], 0, priority=3), seq([9, 8, 7, 6, 5, 4], 1, priority=0)
    sched.add(low)
    run(sched)  # low is admitted first and prefills into 2 blocks
    sched.add(high)
    for _ in range(3):
        run(sched)
    batch = run(sched)  # both need a third block; the victim is low, though admitted first
    assert [(s.seq_id, n) for s, n in batch] == [(1, 1)]
    assert low.status is Status.WAITING and sched.waiting[0] is low and high.status is Status.RUNNING
