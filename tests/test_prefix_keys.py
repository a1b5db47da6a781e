"""Prefix-cache block keys never collide: not for chosen blocks, not between tokens and embeds."""
import random
import struct

import torch

from cluster import SamplingParams
from replicas.block_keys import BlockKeyer
from tests.kv_support import make_seq, manager

# Two 16-token blocks with equal CPython (3.8+, 64-bit) tuple hashes: found by a birthday search
# over positions 12-14 (2**26 samples, 42 s of numpy here), the last position closing the gap,
# since xxHash's lanes are invertible. Under the old keys, hash((parent, digest, tokens)), the
# second block hit the first's KV (vLLM's CVE-2025-25183 class).
_PREFIX = [41870, 8795, 1298, 31453, 17963, 22967, 3923, 18210, 31626, 17444, 40848, 38855]
COLLIDING = [
    (_PREFIX + [4229, 14071, 38275, 7], _PREFIX + [28522, 9205, 25602, 12729]),
    (_PREFIX + [41394, 18399, 1804, 7], _PREFIX + [9161, 15258, 46060, 35448]),
    (_PREFIX + [34500, 23027, 12720, 7], _PREFIX + [20957, 12750, 16719, 18441]),
]


def test_blocks_that_collided_under_python_hash_get_different_keys():
    keyer = BlockKeyer()
    for a, b in COLLIDING:
        assert a != b and hash((None, None, tuple(a))) == hash((None, None, tuple(b)))  # the old key
        assert keyer.key(keyer.root, a) != keyer.key(keyer.root, b)


def test_colliding_block_gets_no_prefix_hit():
    kv = manager(num_blocks=8)
    a, b = COLLIDING[0]
    first = make_seq(a + [1])
    assert kv.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    kv.cache_full_blocks(first)
    assert kv.find_prefix(make_seq(a + [2])).num_tokens == 16  # the same block hits
    assert kv.find_prefix(make_seq(b + [1])).num_tokens == 0


def test_engine_serves_the_second_block_of_a_pair_its_own_output(embedded_llm):
    """The issue's reproduction: run one block of a pair, then a prompt starting with the other."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    a, b = COLLIDING[1]
    embedded_llm.generate({"prompt_token_ids": a + [11]}, params, use_tqdm=False)
    after_a = embedded_llm.generate({"prompt_token_ids": b + [11]}, params, use_tqdm=False)[0]
    again = embedded_llm.generate({"prompt_token_ids": b + [11]}, params, use_tqdm=False)[0]
    assert after_a.num_cached_tokens == 0 and again.num_cached_tokens == 16
    assert after_a.outputs[0].token_ids == again.outputs[0].token_ids


def test_many_near_identical_blocks_have_distinct_keys():
    keyer, rng = BlockKeyer(), random.Random(0)
    head = [rng.randrange(50000) for _ in range(12)]
    blocks = {tuple(head + [rng.randrange(50000) for _ in range(4)]) for _ in range(20000)}
    assert len({keyer.key(keyer.root, list(b)) for b in blocks}) == len(blocks)


def test_tokens_and_embeds_with_equal_bytes_differ():
    keyer, root = BlockKeyer(), BlockKeyer().root
    tokens = list(range(1000, 1016))
    raw = struct.pack("<16q", *tokens)
    rows = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(16, 2)  # row i: token i's bytes
    placeholders = [0] * 16
    assert keyer.key(root, tokens) != keyer.key(root, placeholders, [(0, rows)])
    # token id 0 (the placeholder) everywhere against zero rows
    assert keyer.key(root, placeholders) != keyer.key(root, placeholders, [(0, torch.zeros(16, 2))])
    # the boundary between embeds rows and tokens moves, every byte stays
    assert keyer.key(root, [0] * 4 + tokens[4:], [(0, rows[:4])]) != \
        keyer.key(root, [0] * 3 + tokens[3:], [(0, rows[:3])])
    # the same rows at another offset, or split into two runs
    assert keyer.key(root, placeholders, [(0, rows[:4])]) != keyer.key(root, placeholders, [(1, rows[:4])])
    assert keyer.key(root, placeholders, [(0, rows[:4])]) != \
        keyer.key(root, placeholders, [(0, rows[:2]), (2, rows[2:4])])
    # equal bytes, different dtype or row width
    half = torch.arange(32, dtype=torch.float16).reshape(16, 2)
    assert keyer.key(root, placeholders, [(0, half)]) != keyer.key(root, placeholders, [(0, half.view(torch.bfloat16))])
    assert keyer.key(root, placeholders, [(0, rows)]) != keyer.key(root, placeholders[:8], [(0, rows.reshape(8, 4))])


def test_keys_chain_on_the_parent_and_depend_on_the_engine_secret():
    keyer, tokens = BlockKeyer(), list(range(16))
    first = keyer.key(keyer.root, tokens)
    assert keyer.key(first, tokens) != first
    assert keyer.key(keyer.key(keyer.root, [1] * 16), tokens) != keyer.key(first, tokens)
    assert keyer.key(keyer.root, tokens) == first and isinstance(first, bytes) and len(first) == 32
    other = BlockKeyer()  # os.urandom per engine
    assert other.root != keyer.root and other.key(other.root, tokens) != first
    same_a, same_b = BlockKeyer(b"k" * 32), BlockKeyer(b"k" * 32)
    assert same_a.key(same_a.root, tokens) == same_b.key(same_b.root, tokens)


def test_repeated_embeds_prefix_hits_and_a_changed_row_misses():
    kv = manager(num_blocks=16)
    rows = torch.randn(40, 8)
    first = make_seq(embeds=rows)
    assert kv.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    kv.cache_full_blocks(first)
    assert kv.find_prefix(make_seq(embeds=rows.clone())).num_tokens == 32
    changed = rows.clone()
    changed[20, 3] += 1e-3
    assert kv.find_prefix(make_seq(embeds=changed)).num_tokens == 16
    assert kv.find_prefix(make_seq(embeds=rows.to(torch.float64))).num_tokens == 0


def test_token_prompt_never_hits_an_embeds_prompt_with_the_same_placeholder_ids():
    kv = manager(num_blocks=16)
    embeds = make_seq(embeds=torch.zeros(33, 8))
    assert kv.allocate(embeds, embeds.num_tokens)
    embeds.num_computed_tokens = embeds.num_tokens
    kv.cache_full_blocks(embeds)
    assert kv.find_prefix(make_seq(list(embeds.token_ids))).num_tokens == 0
    kv.free(embeds)
    kv.check_integrity()
