"""Paged KV-cache blocks: allocation with reference counts and prefix caching by chained block hashes."""

from __future__ import annotations

from slimquant.engine.sequence import Sequence


class Block:
    """One KV block; hash/token_ids are set once it is full and computed (then it can be shared)."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    """Hands out KV blocks to sequences; freed full blocks stay findable by hash until reused (LRU)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: least recently freed first
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks not used by any sequence (some may still hold cached prefixes)."""
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks the sequence needs so that its table covers num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of seq's tokens; the last token is always left to compute."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        hits = []
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // self.block_size)):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, i):
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_tokens: int, hits: list[int] = ()) -> bool:
        """Give a new sequence its cached prefix `hits`, then blocks up to num_tokens; False if too few free."""
        assert not seq.block_table or not hits
        cost = sum(self.blocks[b].ref_count == 0 for b in hits)
        if cost + max(0, -(-num_tokens // self.block_size) - len(hits)) > len(self.free):
            return False
        for block_id in hits:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_cached_tokens is None:  # reported as the prefix-cache hit of the first admission
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_committed_blocks = len(hits)
        return self.extend(seq, num_tokens)

    def extend(self, seq: Sequence, num_tokens: int) -> bool:
        """Append fresh blocks so the table covers num_tokens tokens; False (and nothing done) if too few free."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block_id = next(iter(self.free))
            self._forget(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def free_seq(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first, so the tail is evicted first) and reset its progress."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_committed_blocks = 0

    def commit(self, seq: Sequence) -> None:
        """Make the sequence's full, computed blocks findable by hash."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i, h in enumerate(self._hashes(seq, num_full)[seq.num_committed_blocks :], seq.num_committed_blocks):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, self._block_tokens(seq, i)
                self.hash_to_block[h] = block.block_id
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of seq's first num_blocks full blocks (cached on the sequence)."""
        while len(seq.block_hashes) < num_blocks:
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash((parent, self._block_tokens(seq, len(seq.block_hashes)))))
        return seq.block_hashes[:num_blocks]

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        """Drop a free block's cached content before reusing it."""
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()
