"""Cost of a prefix-cache block key: SHA-256 (replicas.block_keys), keyed BLAKE2b-256 and the old
Python hash() of a tuple, per 16-token block, for token blocks and embeds blocks of several widths.

Prints a table of microseconds per block (best of 5 rounds) and writes bench/results/block-keys-<cpu>.json.

    python bench/block_keys.py [--reps 2000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import machine, slug, versions  # noqa: E402
from replicas.block_keys import BlockKeyer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = os.urandom(32)
BLOCK = 16
EMBEDS = [(576, torch.float32, "SmolLM2-135M, CPU"), (2048, torch.bfloat16, "Llama-3.2-1B"),
          (4096, torch.bfloat16, "Llama-3.1-8B"), (4096, torch.float32, "8B width, fp32")]


def old_key(parent, tokens, embeds):
    """What the engine did before: a 16-byte digest of the embeds bytes inside a hash() tuple."""
    digest = None
    if embeds is not None:
        raw = embeds.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        digest = hashlib.blake2b(raw + str(embeds.dtype).encode(), digest_size=16).digest()
    return hash((parent, digest, tuple(tokens)))


def blake2b_key(parent, tokens, embeds):
    """The same encoding under keyed BLAKE2b-256 (hashlib's own implementation, no CPU instructions)."""
    h = hashlib.blake2b(parent, digest_size=32, key=SECRET)
    if embeds is not None:
        h.update(b"E" + str(embeds.dtype).encode())
        h.update(embeds.contiguous().view(-1).view(torch.uint8).numpy())
    h.update(b"T" + struct.pack(f"<Q{len(tokens)}q", len(tokens), *tokens))
    return h.digest()


def per_block_us(fn, reps: int) -> float:
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
    return min(rounds)  # best of 5: the least disturbed by other processes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    keyer = BlockKeyer()
    parent = keyer.key(keyer.root, list(range(BLOCK)))
    tokens = [int(t) for t in torch.randint(0, 128000, (BLOCK,))]
    cases = [("tokens", tokens, None)]
    cases += [(f"embeds {h} {str(d)[6:]} ({name})", [0] * BLOCK, torch.randn(BLOCK, h).to(d)) for h, d, name in EMBEDS]

    rows = []
    for label, toks, emb in cases:
        new = per_block_us(lambda: keyer.key(parent, toks, [] if emb is None else [(0, emb)]), args.reps)
        blake = per_block_us(lambda: blake2b_key(parent, toks, emb), args.reps)
        old = per_block_us(lambda: old_key(hash(parent), toks, emb), args.reps)
        nbytes = 0 if emb is None else emb.numel() * emb.element_size()
        rows.append({"block": label, "bytes": nbytes or 8 * BLOCK, "sha256_us": round(new, 2),
                     "blake2b_us": round(blake, 2), "old_hash_us": round(old, 2),
                     "sha256_us_per_token": round(new / BLOCK, 3)})

    print(f"{'block (16 positions)':40s} {'bytes':>7s} {'SHA-256 us':>11s} {'BLAKE2b us':>11s} {'old hash() us':>14s} "
          f"{'SHA-256 us/token':>17s}")
    for r in rows:
        print(f"{r['block']:40s} {r['bytes']:7d} {r['sha256_us']:11.2f} {r['blake2b_us']:11.2f} {r['old_hash_us']:14.2f} "
              f"{r['sha256_us_per_token']:17.3f}")
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"block-keys-{slug(info['cpu'])}.json"
    out.write_text(json.dumps({"machine": info, "versions": versions(), "reps": args.reps, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
