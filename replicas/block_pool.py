"""Fixed-size KV blocks: reference counts, an LRU free queue, and the prefix-cache index."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class KVIntegrityError(AssertionError):
    """The pool's or the block tables' accounting disagrees with itself; the message names how."""


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the prefix cache


class BlockPool:
    """Free blocks keep their cached contents until they are handed out again (LRU eviction)."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block key -> block id

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def take_cached(self, block: KVBlock) -> None:
        """Share a prefix-cache hit with one more sequence."""
        if block.ref_cnt == 0:
            del self._free[block.block_id]
        block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached contents
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Release in the given order; the caller passes tail blocks first so they are evicted first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: bytes) -> None:
        if not self.enable_caching or block_hash in self._cached:
            return
        self.blocks[block_id].block_hash = block_hash
        self._cached[block_hash] = block_id

    def problems(self) -> list[str]:
        """What is inconsistent: every block is either free (ref 0, in the LRU queue) or in use
        (ref > 0, not in it), and the prefix index and the blocks' keys match one to one."""
        out = []
        in_use = [b for b in self.blocks if b.ref_cnt > 0]
        cached_free = [i for i in self._free if self.blocks[i].block_hash is not None]
        if len(self._free) + len(in_use) != self.num_blocks:
            out.append(f"free ({len(self._free) - len(cached_free)}) + cached-free ({len(cached_free)}) + "
                       f"in use ({len(in_use)}) != total ({self.num_blocks})")
        for b in self.blocks:
            if b.ref_cnt < 0:
                out.append(f"block {b.block_id} has ref count {b.ref_cnt}")
            if (b.ref_cnt == 0) != (b.block_id in self._free):
                state = "in" if b.block_id in self._free else "not in"
                out.append(f"block {b.block_id} has ref count {b.ref_cnt} but is {state} the free queue")
            if b.block_hash is not None and self._cached.get(b.block_hash) != b.block_id:
                out.append(f"block {b.block_id} has a key the prefix index maps to {self._cached.get(b.block_hash)}")
        for key, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != key:
                out.append(f"the prefix index maps a key to block {block_id}, which holds another")
        return out

    def check_integrity(self) -> None:
        """Raise KVIntegrityError naming every discrepancy (debug and test use: O(num_blocks))."""
        raise_problems(self.problems())


def raise_problems(problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise KVIntegrityError(f"KV cache accounting is inconsistent: {shown}")
