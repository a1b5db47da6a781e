"""Triton kernels over the paged KV cache: the fused K/V write and one attention kernel for a
flattened batch that mixes prefill chunks and decodes (varlen, causal, GQA), with an optional
split over the keys for long contexts at small batch (partials merged by a second kernel).

Cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]; slot s of the K half
starts at element s * num_kv_heads * head_dim.
"""
from __future__ import annotations

import triton
import triton.language as tl

from replicas.models.fused_pointwise import rotated_heads
from replicas.pdl import wait_for_previous


@triton.jit
def store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_row_stride, v_row_stride, v_half_offset,
                    ROW: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per new token: copy its K and V rows ([Hkv * D], contiguous) into its slot.
    A negative slot (padding rows of a captured graph) writes nothing."""
    wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)
    k = tl.load(k_ptr + t * k_row_stride + offs, mask=mask)
    v = tl.load(v_ptr + t * v_row_stride + offs, mask=mask)
    tl.store(cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(cache_ptr + v_half_offset + slot * ROW + offs, v, mask=mask)


@triton.jit
def rope_store_kv_kernel(qk_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, cache_ptr, slot_ptr, qk_row_stride, v_row_stride,
                         cos_row_stride, v_half_offset, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         HEADS_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                         ROW_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per new token: the rotary embedding of its query and key heads (qk: [T, H + Hkv,
    D], queries first), queries to q_out ([T, H, D]), keys and its V row into its cache slot (none
    for a negative slot). store_kv_kernel and the rope kernel in one pass, the same arithmetic."""
    wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_BLOCK)[:, None]
    d = tl.arange(0, HALF_BLOCK)[None, :]
    mask = (h < NUM_HEADS + NUM_KV_HEADS) & (d < HALF)
    at = h * (2 * HALF) + d
    out1, out2 = rotated_heads(qk_ptr + t * qk_row_stride, cos_ptr + t * cos_row_stride,
                               sin_ptr + t * cos_row_stride, at, d, mask, HALF)
    q_mask = mask & (h < NUM_HEADS)
    q_row = q_out_ptr + t * (NUM_HEADS * 2 * HALF)
    tl.store(q_row + at, out1, mask=q_mask)
    tl.store(q_row + at + HALF, out2, mask=q_mask)
    row = NUM_KV_HEADS * 2 * HALF
    k_mask = mask & (h >= NUM_HEADS) & (slot >= 0)
    k_row = cache_ptr + slot * row + (h - NUM_HEADS) * (2 * HALF) + d
    tl.store(k_row, out1, mask=k_mask)
    tl.store(k_row + HALF, out2, mask=k_mask)
    offs = tl.arange(0, ROW_BLOCK)
    v_mask = (offs < row) & (slot >= 0)
    v = tl.load(v_ptr + t * v_row_stride + offs, mask=v_mask)
    tl.store(cache_ptr + v_half_offset + slot * row + offs, v, mask=v_mask)


@triton.jit
def paged_attention_kernel(
    out_ptr, q_ptr, cache_ptr, v_half_offset, block_table_ptr, seq_rows_ptr, seq_lens_ptr, query_start_ptr,
    part_acc_ptr, part_stats_ptr,
    scale_log2, num_seqs, q_row_stride, out_row_stride, table_row_stride, num_heads,
    QPK: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE_ONLY: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (tile, kv_head, split): BLOCK_Q query tokens of one sequence times the QPK query
    heads that share kv_head, as BLOCK_M rows of one online-softmax pass over the keys.
    WINDOW > 0: sliding-window attention (a query at position p sees keys p - WINDOW + 1 .. p)."""
    wait_for_previous(PDL)
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE_ONLY:
        seq = pid
        tile = 0
    else:
        # Sequence s owns tiles [q_start[s] // BLOCK_Q + s, ...): find the last s whose first tile <= pid.
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
            if first <= pid:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
        tile = pid - (tl.load(query_start_ptr + seq) // BLOCK_Q + seq)

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    table = block_table_ptr + tl.load(seq_rows_ptr + seq).to(tl.int64) * table_row_stride

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_tok = tile * BLOCK_Q + offs_m // QPK
    head = kv_head * QPK + offs_m % QPK
    row_valid = (offs_m < BLOCK_Q * QPK) & (q_tok < q_len)
    q_rows = (q_start + q_tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_row_stride + head[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_valid[:, None], other=0.0)
    q_pos = context + q_tok

    # Causal: this tile's last query sees keys up to its own position.
    kv_end = tl.minimum(seq_len, context + tl.minimum((tile + 1) * BLOCK_Q, q_len))
    # Sliding window: this tile's first query sees nothing before its own position - WINDOW + 1.
    kv_start = 0
    if WINDOW > 0:
        kv_start = tl.maximum(context + tile * BLOCK_Q - WINDOW + 1, 0)
    if NUM_SPLITS == 1:
        kv_lo = kv_start
        kv_hi = kv_end
    else:
        per_split = tl.cdiv(tl.cdiv(kv_end - kv_start, BLOCK_N), NUM_SPLITS) * BLOCK_N
        kv_lo = kv_start + split * per_split
        kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    head_offset = kv_head * HEAD_DIM
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_hi
        block = tl.load(table + offs_n // PAGE, mask=n_valid, other=0).to(tl.int64)
        slot = block * PAGE + offs_n % PAGE
        kv_offsets = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + head_offset + offs_d[None, :]
        k = tl.load(cache_ptr + kv_offsets, mask=n_valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        keep = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        if WINDOW > 0:
            keep = keep & (offs_n[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + v_half_offset + kv_offsets, mask=n_valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * out_row_stride + head[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        # Partials of (query row, head, split): unnormalised acc, and (max, sum) in log2 units.
        part = (q_rows * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])
        tl.store(part_stats_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit
def merge_splits_kernel(out_ptr, part_acc_ptr, part_stats_ptr, out_row_stride, num_heads,
                        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program (query row, head): combine the splits' partial softmax results."""
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    part = (row * num_heads + head) * NUM_SPLITS + offs_s
    m = tl.load(part_stats_ptr + part * 2)
    l = tl.load(part_stats_ptr + part * 2 + 1)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    total = tl.sum(l * w, 0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * out_row_stride + head * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))
