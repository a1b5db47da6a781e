"""Per-sequence block tables over the block pool, with chained-hash prefix caching.

A full block's hash covers its parent's hash and its contents: token ids, or, for prompt-embeds
positions, a digest of the embedding rows' bytes, so a repeated embeds prefix hits too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from replicas.block_pool import BlockPool
from replicas.sequence import Sequence


@dataclass
class PrefixHit:
    block_ids: list[int]
    num_tokens: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hash(self, seq: Sequence, block_index: int, parent: int | None) -> int:
        start, end = block_index * self.block_size, (block_index + 1) * self.block_size
        embeds_end = min(end, seq.num_embeds)
        digest = None
        if start < embeds_end:
            rows = seq.prompt_embeds[start:embeds_end]
            raw = rows.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            digest = hashlib.blake2b(raw + str(rows.dtype).encode(), digest_size=16).digest()
        tokens = tuple(seq.token_ids[max(start, seq.num_embeds):end])
        return hash((parent, digest, tokens))

    def _hash_of(self, seq: Sequence, block_index: int) -> int:
        while len(seq.block_hashes) <= block_index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(self._block_hash(seq, i, parent))
        return seq.block_hashes[block_index]

    def find_prefix(self, seq: Sequence) -> PrefixHit:
        """Longest run of cached full blocks at the start of the sequence, leaving at least one
        token to compute (its logits start generation)."""
        if not self.enable_caching:
            return PrefixHit([], 0)
        hits: list[int] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            block = self.pool.lookup(self._hash_of(seq, i))
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
                self.pool.register(block.block_id, self._hash_of(seq, i))
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        self.pool.free(list(reversed(seq.block_table)))
        seq.block_table = []
        seq.block_hashes = []
        seq.num_registered_blocks = 0
