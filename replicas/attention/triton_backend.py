"""Paged attention on CUDA with our Triton kernels: a fused KV write (which applies the rotary
embedding on the way, forward_rotary) and one varlen kernel for mixed prefill/decode batches,
split over the keys when a decode batch is too small to fill the GPU."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from replicas import pdl
from replicas.attention.backend import AttentionBackend, AttentionMetadata
from replicas.attention.triton_kernels import (merge_splits_kernel, paged_attention_kernel, rope_store_kv_kernel,
                                               store_kv_kernel)

_MAX_SPLITS = 16
_MIN_KEYS_PER_SPLIT = 256
# A decode batch of fewer (sequence, KV head) programs than this many per SM reads its keys below
# the card's bandwidth, and splitting the keys pays: on an H200, 192 and 256 programs were 10-20%
# faster in 2 splits, 384 and more fastest whole (bench/attention_splits.py).
_PROGRAMS_PER_SM = 2.5


@dataclass
class LaunchPlan:
    """What one step's kernel launches need, fixed before the layers (or a graph capture) run."""

    grid: tuple[int, int, int]
    block_q: int
    block_m: int
    block_n: int
    decode_only: bool
    num_splits: int
    num_warps: int
    num_rows: int  # query rows (tokens) the step carries


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _v_half(kv_cache: torch.Tensor) -> int:
    """Elements from a layer's K half to its V half."""
    return kv_cache[1].storage_offset() - kv_cache[0].storage_offset()


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 max_decode_batch: int):
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f"the triton backend needs a power-of-two head_dim >= 16, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qpk = num_heads // num_kv_heads
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        self.num_sms = props.multi_processor_count if props else 8
        # Split partials for the largest split decode batch, allocated once (graphs reuse them).
        most = max((b * self.splits_for(b) for b in range(1, max_decode_batch + 1) if self.splits_for(b) > 1),
                   default=0)
        self.part_acc = torch.empty(max(most, 1) * num_heads * head_dim, dtype=torch.float32, device=device)
        self.part_stats = torch.empty(max(most, 1) * num_heads * 2, dtype=torch.float32, device=device)

    def splits_for(self, batch: int) -> int:
        """Splits over the keys for a decode batch: enough programs for _PROGRAMS_PER_SM on every SM."""
        programs = batch * self.num_kv_heads
        target = int(_PROGRAMS_PER_SM * self.num_sms)
        if programs >= target:
            return 1
        return min(_MAX_SPLITS, _next_pow2(-(-target // programs)))

    def plan(self, num_rows: int, num_seqs: int, max_query_len: int, max_seq_len: int,
             split_batch: int | None = None) -> LaunchPlan:
        """split_batch: the batch size whose split count to use (a captured graph's padded size),
        so eager and graph decode steps add up keys in the same order."""
        if max_query_len == 1 and num_rows == num_seqs:
            splits = self.splits_for(split_batch or num_seqs)
            if split_batch is None and max_seq_len < 2 * _MIN_KEYS_PER_SPLIT:
                splits = 1
            block_m = max(16, _next_pow2(self.qpk))
            return LaunchPlan((num_seqs, self.num_kv_heads, splits), 1, block_m, 64, True, splits, 4, num_rows)
        block_m = 128 if self.head_dim <= 64 else 64
        block_q = max(1, block_m // self.qpk)
        tiles = num_rows // block_q + num_seqs
        return LaunchPlan((tiles, self.num_kv_heads, 1), block_q, block_m, 64, False, 1, 8 if block_m == 128 else 4,
                          num_rows)

    def prepare(self, meta: AttentionMetadata) -> None:
        if "plan" not in meta.backend_state:
            meta.backend_state["plan"] = self.plan(meta.slot_mapping.shape[0], meta.num_seqs, meta.max_query_len,
                                                   meta.max_seq_len)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float, window: int = 0):
        rows = meta.backend_state["plan"].num_rows
        row = self.num_kv_heads * self.head_dim
        store_kv_kernel[(rows,)](k, v, kv_cache, meta.slot_mapping, k.stride(0), v.stride(0), _v_half(kv_cache),
                                 ROW=row, BLOCK=_next_pow2(row), num_warps=4, **pdl.launch(q))
        return self._attend(q, kv_cache, meta, scale, window)

    def forward_rotary(self, qk, v, cos, sin, kv_cache, meta: AttentionMetadata, scale: float, window: int = 0):
        rows = meta.backend_state["plan"].num_rows
        q = torch.empty((rows, self.num_heads, self.head_dim), dtype=qk.dtype, device=qk.device)
        assert qk.stride(2) == 1 and qk.stride(1) == self.head_dim and v.stride(-1) == 1
        assert cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0)
        half = self.head_dim // 2
        rope_store_kv_kernel[(rows,)](
            qk, v, cos, sin, q, kv_cache, meta.slot_mapping, qk.stride(0), v.stride(0), cos.stride(0),
            _v_half(kv_cache), NUM_HEADS=self.num_heads, NUM_KV_HEADS=self.num_kv_heads,
            HEADS_BLOCK=_next_pow2(self.num_heads + self.num_kv_heads), HALF=half, HALF_BLOCK=_next_pow2(half),
            ROW_BLOCK=_next_pow2(self.num_kv_heads * self.head_dim), num_warps=4, enable_fp_fusion=False,
            **pdl.launch(qk))
        return self._attend(q, kv_cache, meta, scale, window)

    def _attend(self, q, kv_cache, meta: AttentionMetadata, scale: float, window: int):
        """Attention over the cache, which already holds this step's keys and values."""
        plan: LaunchPlan = meta.backend_state["plan"]
        rows = plan.num_rows
        launch = pdl.launch(q)
        v_half = _v_half(kv_cache)
        out = torch.empty((rows, self.num_heads, self.head_dim), dtype=q.dtype, device=q.device)
        paged_attention_kernel[plan.grid](
            out, q, kv_cache, v_half, meta.block_tables, meta.seq_rows, meta.seq_lens, meta.query_start_loc,
            self.part_acc, self.part_stats,
            scale * 1.4426950408889634, meta.num_seqs, q.stride(0), out.stride(0), meta.block_tables.stride(0),
            self.num_heads,
            QPK=self.qpk, HEAD_DIM=self.head_dim, NUM_KV_HEADS=self.num_kv_heads, PAGE=meta.block_size,
            BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, DECODE_ONLY=plan.decode_only,
            NUM_SPLITS=plan.num_splits, IEEE=q.dtype == torch.float32, WINDOW=window, num_warps=plan.num_warps,
            **launch,
        )
        if plan.num_splits > 1:
            merge_splits_kernel[(rows, self.num_heads)](out, self.part_acc, self.part_stats, out.stride(0),
                                                        self.num_heads, HEAD_DIM=self.head_dim,
                                                        NUM_SPLITS=plan.num_splits, num_warps=4, **launch)
        return out
