"""BlockManager: allocation, reference counts, prefix-cache hits, LRU reuse; Scheduler: batching and preemption."""

from __future__ import annotations

from slimquant.config import EngineConfig
from slimquant.engine.block_manager import BlockManager
from slimquant.engine.scheduler import Scheduler
from slimquant.engine.sequence import Request, Sequence, SequenceStatus
from slimquant.sampling_params import SamplingParams


def seq(ids: list[int], **params) -> Sequence:
    """A bare sequence (no detokenizer, no generator)."""
    return Sequence(Request("r", None, ids, SamplingParams(**params)), 0, None, None, frozenset())


def computed(bm: BlockManager, s: Sequence, n: int) -> None:
    """Pretend a forward ran n more tokens of s."""
    s.num_computed_tokens += n
    bm.commit(s)


def test_allocate_extend_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(list(range(6)))
    assert bm.allocate(s, 6) and len(s.block_table) == 2 and bm.num_free_blocks == 2
    assert bm.extend(s, 8) and len(s.block_table) == 2  # still fits
    assert bm.extend(s, 9) and len(s.block_table) == 3
    assert not bm.extend(s, 17) and len(s.block_table) == 3  # needs 2 more, 1 free: nothing taken
    bm.free_seq(s)
    assert bm.num_free_blocks == 4 and s.block_table == [] and s.num_computed_tokens == 0


def test_prefix_hits_are_shared_and_leave_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(10)))
    bm.allocate(a, 10)
    computed(bm, a, 10)  # blocks 0-3 and 4-7 are full -> hashed
    b = seq(list(range(8)) + [99, 98, 97])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, 11, hits) and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert a.num_cached_tokens == 0
    assert bm.blocks[hits[0]].ref_count == 2 and len(b.block_table) == 3
    exact = seq(list(range(8)))  # fully cached: the last block is recomputed so logits exist
    assert len(bm.match_prefix(exact)) == 1
    assert bm.match_prefix(seq([1, 2, 3, 4, 5])) == []
    assert bm.match_prefix(seq(list(range(8)), prompt_logprobs=1)) == []  # logprobs need every position


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    computed(bm, a, 5)
    bm.free_seq(a)
    assert bm.num_free_blocks == 3 and len(bm.match_prefix(seq([1, 2, 3, 4, 9]))) == 2
    c = seq([7, 7, 7, 7, 7, 7])
    bm.allocate(c, 6)  # takes every block; the tail block of a goes first, then the hashed ones
    assert bm.match_prefix(seq([1, 2, 3, 4, 9])) == [] and bm.hash_to_block == {}


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    computed(bm, a, 5)
    assert bm.match_prefix(seq([1, 2, 3, 4, 5])) == []


def scheduler(num_blocks: int, **kwargs) -> Scheduler:
    cfg = EngineConfig("m", block_size=4, enable_prefix_caching=False, **kwargs)
    cfg.resolve(64)
    return Scheduler(cfg, BlockManager(num_blocks, 4, False))


def run_step(sch: Scheduler, sample_token: int = 7):
    """Schedule, pretend to compute, append a token to sequences that reached their end."""
    batch = sch.schedule()
    sch.update(batch)
    for s in batch.seqs:
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sample_token)
    return batch


def test_prefill_and_decode_share_a_step_and_chunks_respect_the_budget():
    sch = scheduler(16, max_num_batched_tokens=8)
    a, b = seq(list(range(5))), seq(list(range(12)))
    sch.add(a)
    sch.add(b)
    first = run_step(sch)
    assert first.num_new_tokens == [5, 3]  # b is chunked to the budget
    second = run_step(sch)
    assert second.seqs == [a, b] and second.num_new_tokens == [1, 7]
    third = run_step(sch)
    assert third.num_new_tokens == [1, 2]  # a decodes; b runs its last 2 prompt tokens and samples


def test_max_num_seqs_limits_running():
    sch = scheduler(16, max_num_seqs=2)
    for _ in range(3):
        sch.add(seq([1, 2, 3]))
    assert len(run_step(sch)) == 2 and len(sch.waiting) == 1


def test_preemption_requeues_the_newest_and_keeps_its_tokens():
    sch = scheduler(4)  # 16 token slots
    a, b = seq([1] * 7), seq([2] * 7)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # both prefilled and sampled: 8 tokens each
    run_step(sch)  # position 7 still fits in 2 blocks each: the cache is now full
    batch = run_step(sch)  # a needs a 3rd block: b is preempted
    assert batch.seqs == [a] and b.status == SequenceStatus.WAITING and sch.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.num_tokens == 9 and list(sch.waiting) == [b]
    sch.finish(a)
    batch = sch.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [9]  # recomputes prompt + its generated tokens


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_that_fits_it():
    sch = scheduler(32, max_num_batched_tokens=64, enable_chunked_prefill=False)
    a, b = seq(list(range(40))), seq(list(range(30)))
    sch.add(a)
    sch.add(b)
    assert run_step(sch).num_new_tokens == [40]  # b (30) does not fit in the 24 left
    assert run_step(sch).num_new_tokens == [1, 30]
