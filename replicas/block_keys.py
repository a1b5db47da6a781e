"""Prefix-cache block keys: a SHA-256 digest of the parent block's key and the block's content.

A lookup trusts the key without comparing contents, so keys must not collide, even for blocks an
attacker chose: a 256-bit cryptographic digest, chained from a root key drawn from random bytes
per engine (so no key can be computed outside the engine), over an encoding that no two different
blocks share:

    parent key (32 bytes; a sequence's first block has the engine's root key)
    per run of embeds rows: b"E", offset in the block, rows, row bytes, then the SHA-256 of
                            (dtype name length, dtype name, the rows' raw bytes)
    b"T", count, the token ids of all positions as little-endian int64 (embeds positions hold
          the engine's placeholder id)

All counts are little-endian uint64; offsets and row counts say exactly which positions are
embeds, so token ids and embeds rows with equal bytes differ too. SHA-256 rather
than BLAKE2b: OpenSSL's uses the CPU's SHA instructions, 2-3x hashlib's BLAKE2b on embeds rows
here (bench/block_keys.py).
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

import torch

KEY_BYTES = 32


class BlockKeyer:
    def __init__(self, secret: bytes | None = None):
        """`secret`: random per engine (os.urandom) unless given (tests). Keys never leave the
        engine and hits depend only on key equality, so nothing needs them reproducible."""
        secret = os.urandom(KEY_BYTES) if secret is None else secret
        self.root = hashlib.sha256(b"raylm prefix-cache root\0" + secret).digest()

    def key(self, parent: bytes, token_ids: Sequence[int],
            embeds: Sequence[tuple[int, torch.Tensor]] = ()) -> bytes:
        """The key of a block after `parent` (self.root for the first): `token_ids` has one id per
        position, `embeds` lists the (offset in the block, rows) runs of embedding rows, each
        optionally with its rows_digest already computed: (offset, rows, digest)."""
        h = hashlib.sha256(parent)
        for entry in embeds:
            offset, rows = entry[0], entry[1]
            digest = entry[2] if len(entry) > 2 else rows_digest(rows)
            row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
            h.update(b"E" + struct.pack("<QQQ", offset, rows.shape[0], row_bytes) + digest)
        h.update(b"T" + struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
        return h.digest()


def rows_digest(rows: torch.Tensor) -> bytes:
    """SHA-256 of a run of embedding rows: their dtype name and raw bytes."""
    rows = rows.detach().cpu().contiguous()
    return _digest(_dtype_header(rows.dtype), rows.view(-1).view(torch.uint8).numpy())  # bf16: no numpy dtype


def block_run_digests(segments: Sequence[tuple[int, torch.Tensor]], block_size: int,
                      num_blocks: int) -> list[list[bytes]]:
    """rows_digest of every embeds run of blocks [0, num_blocks), block by block: what KVCacheManager
    hashes on a digest thread (hashlib releases the GIL while it hashes, and slicing byte views
    keeps the Python work per block small)."""
    views = []
    for first, rows in segments:
        rows = rows.detach().cpu().contiguous()
        views.append((first, rows.shape[0], rows[0].numel() * rows.element_size(), _dtype_header(rows.dtype),
                      memoryview(rows.view(-1).view(torch.uint8).numpy())))
    out: list[list[bytes]] = []
    for b in range(num_blocks):
        start, end = b * block_size, (b + 1) * block_size
        runs = []
        for first, n, row_bytes, header, data in views:
            lo, hi = max(start, first), min(end, first + n)
            if lo < hi:
                runs.append(_digest(header, data[(lo - first) * row_bytes:(hi - first) * row_bytes]))
        out.append(runs)
    return out


def _dtype_header(dtype: torch.dtype) -> bytes:
    name = str(dtype).encode()
    return struct.pack("<Q", len(name)) + name


def _digest(header: bytes, data) -> bytes:
    h = hashlib.sha256(header)
    h.update(data)
    return h.digest()
