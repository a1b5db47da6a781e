"""Per-sequence block tables over the block pool, with chained-key prefix caching.

A full block's key (replicas.block_keys) covers its parent's key and its contents: token ids, or,
at prompt-embeds positions, the embedding rows' bytes, so a repeated embeds prefix hits too.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable
from dataclasses import dataclass

from replicas.block_keys import BlockKeyer, block_run_digests
from replicas.block_pool import BlockPool, raise_problems
from replicas.sequence import Sequence, SequenceStatus


_DIGESTERS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="raylm-embeds-digest")


@dataclass
class PrefixHit:
    block_ids: list[int]
    num_tokens: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, hash_secret: bytes | None = None):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.keyer = BlockKeyer(hash_secret)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def start_digests(self, seq: Sequence) -> None:
        """Digest the sequence's embeds rows on a digest thread, block by block, while it waits and
        while its prefill runs (the chained keys then hash 32 bytes per run instead of the rows)."""
        if self.enable_caching and seq.num_embeds and seq.embeds_digests is None:
            num_blocks = (seq.num_embeds - 1) // self.block_size + 1
            seq.embeds_digests = _DIGESTERS.submit(block_run_digests, list(seq.embeds_segments), self.block_size,
                                                   num_blocks)

    def _block_key(self, seq: Sequence, block_index: int, parent: bytes, wait: bool = True) -> bytes:
        """wait=False: when the digest thread has not finished this sequence, hash this block's rows
        here instead of waiting behind other sequences' rows."""
        start, end = block_index * self.block_size, (block_index + 1) * self.block_size
        spans = [(pos - start, rows) for pos, rows in seq.embeds_spans(start, end)]
        if spans:
            self.start_digests(seq)
            if wait or seq.embeds_digests.done():
                digests = seq.embeds_digests.result()[block_index]
                spans = [(offset, rows, digest) for (offset, rows), digest in zip(spans, digests)]
        return self.keyer.key(parent, seq.token_ids[start:end], spans)

    def _key_of(self, seq: Sequence, block_index: int, wait: bool = True) -> bytes:
        while len(seq.block_hashes) <= block_index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else self.keyer.root
            seq.block_hashes.append(self._block_key(seq, i, parent, wait))
        return seq.block_hashes[block_index]

    def find_prefix(self, seq: Sequence) -> PrefixHit:
        """Longest run of cached full blocks at the start of the sequence, leaving at least one
        token to compute (its logits start generation)."""
        if not self.enable_caching:
            return PrefixHit([], 0)
        hits: list[int] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            block = self.pool.lookup(self._key_of(seq, i, wait=False))
            if block is None:
                break
            hits.append(block.block_id)
        return PrefixHit(hits, len(hits) * self.block_size)

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Make room for num_new_tokens more computed tokens; False (and no change) if the pool is short."""
        hit_blocks = hit.block_ids if hit else []
        # Hit blocks sitting in the free queue stop being free once taken.
        hit_from_free = sum(1 for b in hit_blocks if self.pool.blocks[b].ref_cnt == 0)
        have = len(seq.block_table) + len(hit_blocks)
        computed = seq.num_computed_tokens + (hit.num_tokens if hit else 0)
        need = self.blocks_needed(computed + num_new_tokens) - have
        if need + hit_from_free > self.pool.num_free:
            return False
        for block_id in hit_blocks:
            self.pool.take_cached(self.pool.blocks[block_id])
        seq.block_table.extend(hit_blocks)
        if need > 0:
            seq.block_table.extend(b.block_id for b in self.pool.allocate(need))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every full, computed block of the sequence in the prefix cache."""
        if not self.enable_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_registered_blocks, num_full):
            block = self.pool.blocks[seq.block_table[i]]
            if block.block_hash is None:
                self.pool.register(block.block_id, self._key_of(seq, i))
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        self.pool.free(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.block_hashes = []
        seq.num_registered_blocks = 0

    def check_integrity(self, live: Iterable[Sequence] = ()) -> None:
        """Raise KVIntegrityError (an AssertionError) naming every discrepancy between the pool and
        the live sequences (running and waiting): each block's ref count is the number of their
        block tables holding it, a table covers the computed tokens, and a registered block's key
        is its sequence's key for that position. Call between steps; O(blocks + table entries)."""
        problems = self.pool.problems()
        holders: Counter[int] = Counter()
        for seq in live:
            who = f"sequence {seq.request_id}/{seq.index}"
            if len(set(seq.block_table)) != len(seq.block_table):
                problems.append(f"{who} holds a block twice: {seq.block_table}")
            holders.update(seq.block_table)
            lo, hi = self.blocks_needed(seq.num_computed_tokens), self.blocks_needed(seq.num_tokens)
            if not lo <= len(seq.block_table) <= hi:
                problems.append(f"{who} has {len(seq.block_table)} blocks for {seq.num_computed_tokens} computed "
                                f"of {seq.num_tokens} tokens (expected {lo}..{hi})")
            if seq.status is not SequenceStatus.RUNNING and seq.block_table:
                problems.append(f"{who} is {seq.status.value} but holds blocks {seq.block_table}")
            key = self.keyer.root
            for i, block_id in enumerate(seq.block_table[:seq.num_registered_blocks]):
                key = self._block_key(seq, i, key)  # afresh: a stale seq.block_hashes shows up too
                if self.pool.blocks[block_id].block_hash not in (None, key):
                    problems.append(f"{who} block {i} (id {block_id}) is cached under another content's key")
        for b in self.pool.blocks:
            if b.ref_cnt != holders[b.block_id]:
                problems.append(f"block {b.block_id} has ref count {b.ref_cnt} but {holders[b.block_id]} live "
                                f"sequences hold it")
        raise_problems(problems)
