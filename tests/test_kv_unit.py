"""BlockPool, KVCacheManager and Scheduler without a model: accounting, prefix hits, LRU eviction,
preemption and abort, each checked by check_integrity. Milliseconds each."""
import pytest
import torch

from replicas.block_pool import BlockPool, KVIntegrityError
from replicas.sequence import SequenceStatus
from tests.kv_support import BLOCK, live, make_seq, manager, run_step, scheduler


def computed(kv, seq, hit=None):
    """Allocate and mark the whole prompt computed and cached, as a finished prefill leaves it."""
    assert kv.allocate(seq, seq.num_tokens - (hit.num_tokens if hit else 0), hit)
    seq.num_computed_tokens = seq.num_tokens
    seq.status = SequenceStatus.RUNNING
    kv.cache_full_blocks(seq)
    return seq


def drive(sched, max_steps: int = 200) -> list:
    """Each step's SchedulerOutput until no work, finishing sequences at their max_tokens; the step
    count is the deadline."""
    outs = []
    while sched.has_work():
        assert len(outs) < max_steps, f"scheduler still busy after {max_steps} steps"
        outs.append(run_step(sched))
        for seq in list(sched.running):
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq)
    return outs


# -- BlockPool --------------------------------------------------------------------------------

def test_pool_allocate_free_and_refusals():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1] and pool.num_free == 1
    with pytest.raises(RuntimeError, match="asked for 2"):
        pool.allocate(2)
    pool.free([b.block_id for b in blocks])
    assert pool.num_free == 4
    pool.check_integrity()
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([blocks[0].block_id])


def test_pool_evicts_least_recently_freed_first_and_drops_its_key():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    for block, key in zip((a, b, c), (b"ka", b"kb", b"kc")):
        pool.register(block.block_id, key)
    pool.free([c.block_id, a.block_id, b.block_id])  # LRU order: c, a, b
    assert [pool.lookup(k).block_id for k in (b"ka", b"kb", b"kc")] == [a.block_id, b.block_id, c.block_id]
    assert [x.block_id for x in pool.allocate(2)] == [c.block_id, a.block_id]
    assert pool.lookup(b"kc") is None and pool.lookup(b"ka") is None and pool.lookup(b"kb") is b
    pool.check_integrity()


def test_pool_duplicate_key_keeps_the_first_block():
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.allocate(2)
    pool.register(a.block_id, b"same")
    pool.register(b.block_id, b"same")
    assert pool.lookup(b"same") is a and b.block_hash is None
    pool.check_integrity()


def test_pool_integrity_names_what_is_wrong():
    pool = BlockPool(4, enable_caching=True)
    (a,) = pool.allocate(1)
    a.ref_cnt = 0  # "freed" without returning to the queue
    with pytest.raises(KVIntegrityError, match=rf"block {a.block_id} has ref count 0 but is not in the free queue"):
        pool.check_integrity()
    a.ref_cnt = 1
    pool.register(a.block_id, b"k")
    a.block_hash = b"other"
    with pytest.raises(KVIntegrityError, match="prefix index"):
        pool.check_integrity()


# -- KVCacheManager -----------------------------------------------------------------------------

def test_prefix_hits_share_blocks_and_leave_one_token_to_compute():
    kv = manager(16)
    prompt = list(range(100, 100 + 3 * BLOCK))  # exactly three full blocks
    a = computed(kv, make_seq(prompt))
    assert kv.find_prefix(make_seq(prompt)).num_tokens == 2 * BLOCK  # the last token is computed again
    assert kv.find_prefix(make_seq(prompt + [1])).num_tokens == 3 * BLOCK
    diverging = prompt[:BLOCK + 3] + [7] * (2 * BLOCK)
    assert kv.find_prefix(make_seq(diverging)).num_tokens == BLOCK
    assert kv.find_prefix(make_seq([5] + prompt[1:])).num_tokens == 0

    b = make_seq(prompt + [1])
    hit = kv.find_prefix(b)
    computed(kv, b, hit)
    assert b.block_table[:3] == a.block_table and b.block_table[3] not in a.block_table
    assert [kv.pool.blocks[i].ref_cnt for i in a.block_table] == [2, 2, 2]
    kv.check_integrity([a, b])
    kv.free(a)
    kv.check_integrity([b])
    kv.free(b)
    kv.check_integrity()
    assert kv.num_free_blocks == 16


def test_hit_on_freed_blocks_takes_them_back_from_the_free_queue():
    kv = manager(4)
    prompt = list(range(3 * BLOCK + 1))
    kv.free(computed(kv, make_seq(prompt)))  # all 4 blocks free again, 3 still cached
    b = make_seq(prompt)
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 3 * BLOCK
    computed(kv, b, hit)
    assert kv.num_free_blocks == 0
    kv.check_integrity([b])
    short = make_seq([9] * 5)
    assert not kv.allocate(short, 5) and short.block_table == []  # refused, nothing changed
    kv.check_integrity([b, short])  # short is still waiting


def test_freed_sequence_tail_blocks_are_evicted_first():
    kv = manager(4)
    prompt = list(range(3 * BLOCK + 5))  # three full blocks and a partial one
    kv.free(computed(kv, make_seq(prompt)))
    other = make_seq([1] * 5)
    assert kv.allocate(other, 5)  # takes the partial tail block
    assert kv.find_prefix(make_seq(prompt)).num_tokens == 3 * BLOCK
    other2 = make_seq([2] * 5)
    assert kv.allocate(other2, 5)  # evicts the third full block, the first two stay
    assert kv.find_prefix(make_seq(prompt)).num_tokens == 2 * BLOCK
    other.status = other2.status = SequenceStatus.RUNNING
    kv.check_integrity([other, other2])


def test_caching_disabled_never_hits():
    kv = manager(8, caching=False)
    prompt = list(range(2 * BLOCK + 1))
    kv.free(computed(kv, make_seq(prompt)))
    assert kv.find_prefix(make_seq(prompt)).num_tokens == 0
    kv.check_integrity()


def test_integrity_catches_a_leak_a_stale_key_and_a_waiting_holder():
    kv = manager(8)
    seq = computed(kv, make_seq(list(range(2 * BLOCK + 1))))
    with pytest.raises(KVIntegrityError, match="live sequences hold it"):
        kv.check_integrity([])  # the sequence was dropped without kv.free: its blocks leak
    kv.check_integrity([seq])
    seq.token_ids[3] += 1  # contents changed under a cached block
    with pytest.raises(KVIntegrityError, match="cached under another content's key"):
        kv.check_integrity([seq])
    seq.token_ids[3] -= 1
    seq.status = SequenceStatus.WAITING
    with pytest.raises(KVIntegrityError, match="is waiting but holds blocks"):
        kv.check_integrity([seq])


def test_embeds_prompt_hits_its_own_blocks_only():
    kv = manager(16)
    rows = torch.randn(2 * BLOCK + 1, 8)
    kv.free(computed(kv, make_seq(embeds=rows)))
    assert kv.find_prefix(make_seq(embeds=rows.clone())).num_tokens == 2 * BLOCK
    assert kv.find_prefix(make_seq(embeds=rows.to(torch.bfloat16))).num_tokens == 0
    kv.check_integrity()


# -- Scheduler ----------------------------------------------------------------------------------

def test_token_budget_chunks_prefill_first_come_first_served():
    sched = scheduler(32, budget=64)
    seqs = [make_seq(list(range(i, i + 40)), max_tokens=2) for i in range(3)]  # no prefix hits
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [(s.seq, s.num_new_tokens, s.samples) for s in out.scheduled] == [(seqs[0], 40, True),
                                                                             (seqs[1], 24, False)]
    assert list(sched.waiting) == [seqs[2]]
    out = run_step(sched)  # decodes and the rest of the chunk first, then the waiting prompt
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seqs[0], 1), (seqs[1], 16), (seqs[2], 40)]
    assert len(drive(sched)) <= 3
    sched.kv.check_integrity()
    assert sched.kv.num_free_blocks == 32


def test_max_num_seqs_caps_running():
    sched = scheduler(32, budget=256, max_seqs=2)
    for _ in range(3):
        sched.add(make_seq([1, 2, 3], max_tokens=3))
    run_step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 1
    drive(sched)
    assert sched.kv.num_free_blocks == 32


def test_scheduler_prefix_hit_counts_cached_tokens():
    sched = scheduler(32, budget=256)
    prompt = list(range(2 * BLOCK + 4))
    first = make_seq(prompt, max_tokens=1)
    sched.add(first)
    drive(sched)
    second = make_seq(prompt, max_tokens=1)
    sched.add(second)
    out = run_step(sched)
    assert second.num_cached_tokens == 2 * BLOCK
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(second, 4)]
    drive(sched)
    sched.kv.check_integrity()


def test_preemption_recomputes_the_newest_and_everything_finishes():
    sched = scheduler(6, budget=256, caching=False)  # 6 blocks: two 40-token prompts cannot both reach 60
    a, b = make_seq(list(range(40)), max_tokens=20), make_seq(list(range(40)), max_tokens=20)
    sched.add(a)
    sched.add(b)
    preempted = [seq for out in drive(sched) for seq in out.preempted]
    assert preempted and preempted[0] is b and sched.num_preemptions == len(preempted)
    assert a.num_output_tokens == b.num_output_tokens == 20
    sched.kv.check_integrity()
    assert sched.kv.num_free_blocks == 6


def test_preempted_sequence_goes_back_to_the_front_without_blocks():
    sched = scheduler(5, budget=256, caching=False)
    a, b, c = (make_seq(list(range(20)), max_tokens=30) for _ in range(3))  # 2 blocks each, growing
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    assert sched.running == [a, b] and list(sched.waiting) == [c]  # c's 2 blocks do not fit in 1
    for _ in range(40):
        out = run_step(sched)
        if out.preempted:
            assert out.preempted == [b] and list(sched.waiting) == [b, c]
            assert b.block_table == [] and b.num_computed_tokens == 0 and b.status is SequenceStatus.WAITING
            assert b.num_output_tokens > 0  # kept: recomputed later, not generated again
            break
    else:
        raise AssertionError("no preemption with 5 blocks for three growing sequences")


def test_abort_frees_running_and_waiting_sequences():
    sched = scheduler(8, budget=40)
    running, waiting = make_seq(list(range(40)), max_tokens=50), make_seq(list(range(40)), max_tokens=50)
    sched.add(running)
    sched.add(waiting)
    run_step(sched)
    assert sched.running == [running] and list(sched.waiting) == [waiting]
    for seq in (running, waiting):
        seq.finish_reason = "abort"
        sched.finish(seq)
    assert not sched.has_work() and running.block_table == []
    sched.kv.check_integrity(live(sched))
    assert sched.kv.num_free_blocks == 8
