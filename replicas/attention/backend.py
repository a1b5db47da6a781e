"""The attention-backend interface: what every backend gets per step, and how it is picked."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """One flattened batch: B sequences, T query tokens in all (prefill chunks and decodes mixed).

    Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its keys are the first
    seq_lens[i] positions of its block table, the last (query_len) of them written this step.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: context + new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    block_size: int
    # A backend may precompute per-step tensors here once and reuse them in every layer.
    backend_state: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend:
    """Writes new keys/values into the paged cache and attends over it.

    kv_cache for one layer: [2, num_blocks, block_size, num_kv_heads, head_dim].
    """

    name = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the layers run."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]. Returns [T, H, D]."""
        raise NotImplementedError


def get_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    from replicas.attention.torch_backend import TorchAttentionBackend

    if name in (None, "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}")
