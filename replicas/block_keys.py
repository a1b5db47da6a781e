"""Prefix-cache block keys: a keyed BLAKE2b-256 digest of the parent block's key and the block's content.

A lookup trusts the key without comparing contents, so keys must not collide, even for blocks an
attacker chose: a 256-bit cryptographic digest, keyed with random bytes per engine (so nobody
outside can compute a key), over an encoding that no two different blocks share:

    parent key (32 bytes; a sequence's first block has ROOT_KEY)
    [ b"E", rows, row bytes, dtype name length, dtype name, the rows' raw bytes ]   if it has embeds
    b"T", count, token ids as little-endian int64                                   always

All counts are little-endian uint64. Embeds positions come first in a block (they are the
prompt's leading positions), so `rows` says exactly which positions are embeds.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

import torch

KEY_BYTES = 32
ROOT_KEY = b"\x00" * KEY_BYTES


class BlockKeyer:
    def __init__(self, secret: bytes | None = None):
        """`secret`: the BLAKE2b key (up to 64 bytes); random per engine unless given (tests).
        Keys never leave the engine and hits depend only on key equality, so nothing needs them
        to be reproducible across engines."""
        self.secret = os.urandom(KEY_BYTES) if secret is None else secret

    def key(self, parent: bytes, token_ids: Sequence[int], embeds: torch.Tensor | None = None) -> bytes:
        """The key of a block after `parent`, holding `embeds` rows (if any) and then `token_ids`."""
        h = hashlib.blake2b(parent, digest_size=KEY_BYTES, key=self.secret)
        if embeds is not None and embeds.shape[0]:
            rows = embeds.detach().cpu().contiguous()
            dtype = str(rows.dtype).encode()
            h.update(b"E" + struct.pack("<QQQ", rows.shape[0], rows[0].numel() * rows.element_size(), len(dtype)))
            h.update(dtype)
            h.update(rows.view(-1).view(torch.uint8).numpy())  # bf16 has no numpy dtype; its bytes do
        h.update(b"T" + struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
        return h.digest()
