"""What one tensor-parallel rank holds of a Llama-family model, Megatron-style.

Column-parallel: the fused q/k/v projection (by attention heads) and gate/up (by intermediate
rows); row-parallel, summed by an all-reduce: o_proj and down_proj; vocab-parallel: the input
embedding (each rank looks up the ids in its rows, an all-reduce joins them) and the LM head
(each rank scores its rows, an all-gather joins the logits). Norms are replicated.

Heads go to ranks a KV group at a time (a KV head with its query heads), as evenly as the groups
allow, so a rank's query heads always share its KV heads in the same ratio. With fewer KV heads
than ranks, the ranks mapped to one KV head each keep a copy of it and split its query heads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from replicas.config import ModelConfig


@dataclass(frozen=True)
class Span:
    start: int
    size: int


def even_span(n: int, parts: int, index: int) -> Span:
    """Part `index` of [0, n) cut into `parts` contiguous pieces whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    return Span(index * base + min(index, extra), base + (index < extra))


def head_spans(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> tuple[Span, Span]:
    """(query heads, KV heads) of one rank."""
    per_kv = num_heads // num_kv_heads
    if num_kv_heads >= world_size:
        kv = even_span(num_kv_heads, world_size, rank)
        return Span(kv.start * per_kv, kv.size * per_kv), kv
    head = rank * num_kv_heads // world_size
    sharing = [r for r in range(world_size) if r * num_kv_heads // world_size == head]
    if per_kv < len(sharing):
        raise ValueError(f"tensor_parallel_size {world_size} is too large for {num_heads} attention heads over "
                         f"{num_kv_heads} KV heads: {len(sharing)} ranks would share {per_kv} query heads")
    q = even_span(per_kv, len(sharing), sharing.index(rank))
    return Span(head * per_kv + q.start, q.size), Span(head, 1)


@dataclass(frozen=True)
class Partition:
    """How a parameter is cut: the spans of `dim` it keeps (concatenated), of `full` in all,
    zero-padded to `padded` rows where shards must be equal (the vocabulary)."""

    dim: int
    spans: tuple[Span, ...]
    full: int
    padded: int | None = None


class TensorShard:
    """Rank `rank` of `world_size`; `group` runs the collectives (see replicas.parallel.group)."""

    def __init__(self, cfg: ModelConfig, rank: int, world_size: int, group=None):
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"{cfg.num_heads} attention heads do not group evenly over {cfg.num_kv_heads} KV heads")
        if world_size > cfg.num_heads:
            raise ValueError(f"tensor_parallel_size {world_size} exceeds the model's {cfg.num_heads} attention heads")
        self.full, self.rank, self.world_size, self.group = cfg, rank, world_size, group
        self.q_heads, self.kv_heads = head_spans(cfg.num_heads, cfg.num_kv_heads, world_size, rank)
        self.intermediate = even_span(cfg.intermediate_size, world_size, rank)
        self.vocab_rows = -(-cfg.vocab_size // world_size)  # every rank's rows, padding included
        start = rank * self.vocab_rows
        self.vocab = Span(start, max(0, min(cfg.vocab_size, start + self.vocab_rows) - start))

    def local_config(self) -> ModelConfig:
        """The model's shape as this rank runs it: its heads and intermediate rows (the full vocabulary:
        logits are gathered before sampling)."""
        return dataclasses.replace(self.full, num_heads=self.q_heads.size, num_kv_heads=self.kv_heads.size,
                                   intermediate_size=self.intermediate.size)

    def partition(self, name: str) -> Partition | None:
        """How the parameter `name` (raylm's fused names) is cut; None: replicated."""
        c, d = self.full, self.full.head_dim
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            q, kv = self.q_heads, self.kv_heads
            k_at, v_at = c.num_heads * d, (c.num_heads + c.num_kv_heads) * d
            return Partition(0, (Span(q.start * d, q.size * d), Span(k_at + kv.start * d, kv.size * d),
                                 Span(v_at + kv.start * d, kv.size * d)), (c.num_heads + 2 * c.num_kv_heads) * d)
        if name.endswith("o_proj.weight"):
            return Partition(1, (Span(self.q_heads.start * d, self.q_heads.size * d),), c.num_heads * d)
        if name.endswith("gate_up_proj.weight"):
            i = self.intermediate
            return Partition(0, (i, Span(c.intermediate_size + i.start, i.size)), 2 * c.intermediate_size)
        if name.endswith("down_proj.weight"):
            return Partition(1, (self.intermediate,), c.intermediate_size)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            return Partition(0, (self.vocab,), c.vocab_size, self.vocab_rows)
        return None

    def full_shape(self, name: str, local_shape: torch.Size) -> tuple[int, ...]:
        part = self.partition(name)
        if part is None:
            return tuple(local_shape)
        shape = list(local_shape)
        shape[part.dim] = part.full
        return tuple(shape)

    def take(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full-size parameter."""
        part = self.partition(name)
        if part is None:
            return full
        pieces = [full.narrow(part.dim, s.start, s.size) for s in part.spans]
        local = torch.cat(pieces, part.dim) if len(pieces) > 1 else pieces[0]
        if part.padded is not None and part.padded > local.shape[part.dim]:
            pad = list(local.shape)
            pad[part.dim] = part.padded - local.shape[part.dim]
            local = torch.cat([local, local.new_zeros(pad)], part.dim)
        return local

    # ---- the collectives the model calls ----------------------------------------------------------

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[rows, vocab_rows] of this rank's vocabulary -> [rows, vocab] on every rank."""
        rows, k = local.shape[0], self.world_size
        out = local.new_empty((k * rows, self.vocab_rows))
        self.group.all_gather(out, local.contiguous())
        full = out.view(k, rows, self.vocab_rows).transpose(0, 1).reshape(rows, k * self.vocab_rows)
        vocab = self.full.vocab_size
        return full if full.shape[1] == vocab else full[:, :vocab].contiguous()
