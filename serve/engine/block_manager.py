"""The paged KV cache's bookkeeping: which block holds what, who uses it, what can be reused.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns a block table
(its blocks in order), so its K/V need not be contiguous and memory is committed a block at
a time as it grows.

Prefix caching: once a block is full its content is fixed, and it is named by a hash of its
parent block's hash and its own token ids, i.e. by the whole prefix it ends. A new sequence
whose leading blocks hash the same reuses them (reference count + 1) instead of computing
them. A block whose count drops to 0 goes to the back of the free list but keeps its hash:
it is reused by hash until allocation reaches it at the front of the list and overwrites it
(LRU eviction). Freeing a sequence's blocks last-to-first puts its prefix behind its tail,
so shared prefixes are evicted last. Hashes are Python's tuple hash (deterministic for ints);
each block also keeps its token ids, so a hash collision is detected, never served.

Sliding windows (a model whose every layer slides, e.g. Mistral): K/V that slid out of the
window is never read again, so `slide` releases those blocks after each step and a prefix hit
holds only the blocks inside the new sequence's window; their table entries become FREED, so a
sequence holds at most its window, one step's chunk and two partial blocks of cache.
"""

from __future__ import annotations

from collections import OrderedDict

from serve.engine.sequence import Sequence

FREED = -1  # a block-table entry whose block was released: out of every layer's sliding window


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | str | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int | None = None
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # every layer's sliding window (the widest): K/V before a sequence's window is released
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a live sequence (cached free blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding the K/V of seq's leading full blocks. At least one token is
        left to compute, since the step that computes it produces the next token's logits. None
        for a sequence that needs the logits of every prompt position (prompt logprobs)."""
        if not self.enable_prefix_caching or seq.computes_prompt_logprobs:
            return []
        found, parent, bs = [], seq.cache_root, self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = block_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def free_blocks_taken(self, block_ids: list[int]) -> int:
        """How many of these cached blocks (a prefix hit) reusing them takes out of the free list."""
        return sum(
            self.blocks[b].ref_count == 0 for b in block_ids[self._behind_window(len(block_ids) * self.block_size) :]
        )

    def use_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        """Give a sequence with nothing computed the cached blocks of its prefix (those already
        behind its window are named, not held: their entries are FREED)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        behind = self._behind_window(len(block_ids) * self.block_size)
        for i, block_id in enumerate(block_ids):
            block = self.blocks[block_id]
            if i < behind:
                seq.block_table.append(FREED)
            else:
                if block.ref_count == 0:
                    del self.free[block_id]
                block.ref_count += 1
                seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)
        seq.num_computed_tokens = len(block_ids) * self.block_size

    def _behind_window(self, computed: int) -> int:
        """Leading blocks no query from position `computed` on attends to (0 without a window):
        the query at `computed` sees keys from computed - window + 1."""
        return max(0, computed - self.window + 1) // self.block_size if self.window else 0

    def adopt(self, parent: int | str | None, token_ids: tuple[int, ...], keep: set[int]) -> int | None:
        """A free block (not one in `keep`), named as holding `token_ids` after the block hashed
        `parent`, and left in the free list as a cached block (most recently used): the disk
        tier fills it and the scheduler then finds it as a prefix hit. None if no block is free."""
        block_id = next((b for b in self.free if b not in keep), None)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids = block_hash(parent, token_ids), token_ids
        self.cached[block.hash] = block_id
        self.free.move_to_end(block_id)
        return block_id

    def room(self, seq: Sequence) -> int:
        """New tokens seq can take now: the free slots of its last block plus all free blocks."""
        return len(seq.block_table) * self.block_size - seq.num_computed_tokens + self.num_free * self.block_size

    def reserve(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold num_new_tokens more tokens (the caller checked room)."""
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_table)
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]  # evicted: its content is about to be overwritten
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Name the blocks that the last step filled, making them findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else seq.cache_root, tokens)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block.id)  # a twin computed earlier stays the one served
            seq.block_hashes.append(h)

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses go to the back of the free list, tail first."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()

    def slide(self, seq: Sequence) -> None:
        """Under a sliding window, release seq's blocks that nothing will attend to again. Their
        table entries become FREED, so positions keep their indices; a released full block stays
        findable by hash (after commit)."""
        for i in range(min(self._behind_window(seq.num_computed_tokens), len(seq.block_table))):
            if seq.block_table[i] != FREED:
                self._unref(seq.block_table[i])
                seq.block_table[i] = FREED

    def _unref(self, block_id: int) -> None:
        if block_id == FREED:
            return
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
