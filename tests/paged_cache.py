"""A paged KV cache of random pages and one flattened batch over it, for the attention kernel tests
(on the GPU, and under Triton's interpreter on the CPU)."""
from __future__ import annotations

import torch

PAGE = 16


def paged_batch(cases: list[tuple[int, int]], kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: str, num_blocks: int, generator: torch.Generator) -> tuple[torch.Tensor, tuple]:
    """cases: (context tokens, new tokens) per sequence (prefill chunks with and without context,
    decodes). (cache [2, num_blocks, PAGE, kv_heads, head_dim], AttentionMetadata's arguments: slot
    mapping, query starts, sequence lengths, block tables, sequence rows, max query and sequence
    length, page size); each sequence's pages are distinct random blocks."""
    cache = torch.randn((2, num_blocks, PAGE, kv_heads, head_dim), generator=generator, device=device).to(dtype)
    table = torch.zeros((len(cases) + 1, -(-max(c + q for c, q in cases) // PAGE)), dtype=torch.int32, device=device)
    perm = torch.randperm(num_blocks, generator=generator, device=device).int()
    rows, starts, lens, slots, used = [], [0], [], [], 0
    for i, (ctx, new) in enumerate(cases):
        n = -(-(ctx + new) // PAGE)
        table[i + 1, :n] = perm[used:used + n]
        used += n
        rows.append(i + 1)
        starts.append(starts[-1] + new)
        lens.append(ctx + new)
        slots += [int(table[i + 1, p // PAGE]) * PAGE + p % PAGE for p in range(ctx, ctx + new)]
    meta_args = (torch.tensor(slots, device=device), torch.tensor(starts, device=device),
                 torch.tensor(lens, device=device), table, torch.tensor(rows, device=device),
                 max(new for _, new in cases), max(lens), PAGE)
    return cache, meta_args
