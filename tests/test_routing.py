"""router.routing's pure parts: prefix keys and the replica ranking policy (no cluster needed)."""
from __future__ import annotations

import numpy as np

from router.routing import prefix_keys, rank


def test_prefix_keys_share_exactly_the_common_prefix_lengths():
    base = "You are a helpful assistant. " * 20  # 580 characters
    a, b = prefix_keys(base + "What is 2+2?"), prefix_keys(base + "Name a colour.")
    shared = set(a) & set(b)
    assert len(shared) == 6  # 16, 32, 64, 128, 256 and 512 characters are common
    assert prefix_keys("short") == prefix_keys("short")  # a whole short prompt is a key
    assert prefix_keys("short") != prefix_keys("shorter")


def test_prefix_keys_for_token_ids_and_embeds():
    ids = list(range(100))
    assert prefix_keys(ids)[:3] == prefix_keys(ids + [7, 8])[:3]
    e = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    assert prefix_keys(None, e)[:2] == prefix_keys(None, np.concatenate([e, e]))[:2]
    assert prefix_keys(None, e)[0] != prefix_keys(None, e + 1)[0]
    assert set(prefix_keys(ids)).isdisjoint(prefix_keys("x" * 100))


def test_rank_prefers_affinity_while_balanced_else_least_loaded():
    loads = {"a": 3, "b": 1, "c": 2}
    assert rank(loads, "c", imbalance_threshold=4)[0] == ["c"]  # 2 <= 1 + 4: keep the cache hit
    assert rank(loads, "a", imbalance_threshold=1)[0] == ["b"]  # 3 > 1 + 1: least loaded wins
    assert rank(loads, None, imbalance_threshold=4) == [["b"], ["c", "a"]]
    assert rank(loads, "gone", imbalance_threshold=4)[0] == ["b"]
    assert rank({}, "a", imbalance_threshold=4) == []
    ties = {rank({"a": 0, "b": 0}, None, 4)[0][0] for _ in range(200)}
    assert ties == {"a", "b"}  # idle replicas share the work
