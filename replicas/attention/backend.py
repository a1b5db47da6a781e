"""The attention-backend interface: what every backend gets per step, and how it is picked."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from replicas.models.rope import rotate


@dataclass
class AttentionMetadata:
    """One flattened batch: B sequences, T query tokens in all (prefill chunks and decodes mixed).

    Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its keys are the first
    seq_lens[i] positions of its block table (row seq_rows[i] of block_tables), the last
    (query_len) of them written this step.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token; -1: none
    query_start_loc: torch.Tensor  # [B + 1] int64
    seq_lens: torch.Tensor  # [B] int64: context + new tokens
    block_tables: torch.Tensor  # [rows, max_blocks_per_seq] int32: the runner's persistent tables
    seq_rows: torch.Tensor  # [B] int64: each sequence's row of block_tables
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
                meta: AttentionMetadata, scale: float, window: int = 0) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]. Returns [T, H, D]. window > 0: sliding-window attention,
        a query at position p sees the keys at positions p - window + 1 .. p."""
        raise NotImplementedError

    def forward_rotary(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                       window: int = 0) -> torch.Tensor:
        """forward() of queries and keys before the rotary embedding: qk [T, H + Hkv, D] (queries
        first, rows may be strided), cos and sin [T, 1, D]. Here they rotate first; a backend may
        rotate them inside its KV write instead."""
        q, k = rotate(qk, cos, sin).split([qk.shape[1] - v.shape[1], v.shape[1]], dim=1)
        return self.forward(q, k, v, kv_cache, meta, scale, window)


BACKEND_NAMES = ("torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_attention_backend(device: torch.device, name: str | None, *, num_heads: int, num_kv_heads: int,
                          head_dim: int, max_decode_batch: int) -> AttentionBackend:
    """name None: Triton kernels on CUDA (when triton imports), the torch reference elsewhere."""
    if name is None:
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        from replicas.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        if not triton_available():
            raise ValueError("attention_backend='triton' needs the triton package (pip install raylm[cuda])")
        from replicas.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(num_heads, num_kv_heads, head_dim, device, max_decode_batch)
    raise ValueError(f"unknown attention_backend {name!r}; use one of {', '.join(BACKEND_NAMES)}")
