"""Reference attention in plain torch: gather each sequence's paged keys into a padded batch, one SDPA per layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from replicas.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        b, max_q, max_kv, bs = meta.num_seqs, meta.max_query_len, meta.max_seq_len, meta.block_size
        starts = meta.query_start_loc[:-1].long()
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
        seq_lens = meta.seq_lens.long()

        # Query row r of sequence i sits at flat index starts[i] + r; padded rows point at row 0.
        rows = torch.arange(max_q, device=device)
        q_valid = rows[None, :] < q_lens[:, None]  # [B, max_q]
        q_index = torch.where(q_valid, starts[:, None] + rows[None, :], torch.zeros_like(rows)[None, :])

        # Key position p of sequence i lives in slot block_tables[i, p // bs] * bs + p % bs.
        pos = torch.arange(max_kv, device=device)
        tables = meta.block_tables.index_select(0, meta.seq_rows).long()
        blocks = tables.gather(1, (pos // bs)[None, :].expand(b, -1).clamp(max=tables.shape[1] - 1))
        kv_slots = blocks * bs + (pos % bs)[None, :]

        # Causal within the sequence: query row r is at position seq_len - q_len + r.
        q_pos = (seq_lens - q_lens)[:, None] + rows[None, :]  # [B, max_q]
        causal = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < seq_lens[:, None, None])
        # Padded query rows see key 0 so SDPA never normalises an empty row (NaN).
        padding = ~q_valid[:, :, None] & (pos[None, None, :] == 0)

        meta.backend_state.update(
            q_index=q_index, q_valid=q_valid, kv_slots=kv_slots, causal=causal, padding=padding,
            distance=q_pos[:, :, None] - pos[None, None, :], masks={},
            flat_valid=q_valid.reshape(-1).nonzero().squeeze(1),
            all_decode=max_q == 1,
        )

    @staticmethod
    def _mask(st: dict, window: int) -> torch.Tensor:
        """[B, 1, max_q, max_kv], made once per step for each window the layers use."""
        if window not in st["masks"]:
            mask = st["causal"] if not window else st["causal"] & (st["distance"] < window)
            st["masks"][window] = (mask | st["padding"])[:, None, :, :]
        return st["masks"][window]

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, window: int = 0):
        st = meta.backend_state
        num_heads, head_dim = q.shape[1], q.shape[2]
        k_cache = kv_cache[0].view(-1, k.shape[1], head_dim)
        v_cache = kv_cache[1].view(-1, v.shape[1], head_dim)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)

        b, max_q = st["q_index"].shape
        keys = k_cache[st["kv_slots"]].transpose(1, 2)  # [B, Hkv, max_kv, D]
        values = v_cache[st["kv_slots"]].transpose(1, 2)
        if st["all_decode"]:
            queries = q.view(b, 1, num_heads, head_dim).transpose(1, 2)
        else:
            queries = q[st["q_index"]].transpose(1, 2)  # [B, H, max_q, D]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self._mask(st, window), scale=scale,
                                             enable_gqa=num_heads != k.shape[1])
        out = out.transpose(1, 2)  # [B, max_q, H, D]
        if st["all_decode"]:
            return out.reshape(b, num_heads, head_dim)
        return out.reshape(b * max_q, num_heads, head_dim)[st["flat_valid"]]
