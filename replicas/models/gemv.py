"""y = x @ W.T (+ b) for one row on CUDA: one Triton kernel that streams W once.

A decode step of one sequence multiplies one row by every weight matrix; the step is then a read
of the weights, and its speed is the bandwidth that read reaches. cuBLAS falls short of it on the
smaller matrices (H200, Llama-3.1-8B, `bench/gemv.py`: o 2.5 TB/s, qkv 3.2, and at TP=2 qkv 2.1,
o 2.4, down 2.9, against ~3.7-3.9 for gate_up). Here every program owns BLOCK_N output columns,
walks the whole of K with wide loads of its W rows, and writes its outputs itself: no split-K
buffer, no second kernel, and N / BLOCK_N programs to keep every SM's loads in flight. The
config is the best of a sweep over the 8B shapes at TP=1 and 2 (`bench/gemv.py --sweep`).

`gemv_silu_mul` is the MLP's gate/up product with SiLU-and-multiply applied in the same kernel.

Only one row: at 2-4 rows this kernel is slower than cuBLAS (it redoes the float32 multiply of
the W tile per row); 2-32 rows take replicas.models.skinny_gemm. Sums are float32 in another order than cuBLAS's, so the last bit of a bf16
output may differ; float32 models keep F.linear.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from replicas import pdl
from replicas.models.fused_pointwise import silu_times

BLOCK_N = 2  # output columns per program
BLOCK_K = 1024  # weight columns per load
NUM_WARPS = 4
NUM_STAGES = 2
GATED_BLOCK_N = 1  # output columns per program of gemv_silu_mul, each with its gate and up rows
# The attention's qkv projection reads faster with wider tiles (H200, 8B's qkv with the default
# config 13.4 us at TP=1 and 7.8 at TP=2, with these 12.7 and 7.0); o and down read slower with them.
MATRIX_CONFIGS = {"qkv": {"block_n": 4, "block_k": 2048, "num_warps": 8}}
# Smaller weights sit in L2 or are over before cuBLAS's launch cost matters; they keep F.linear
# (and so do the tiny models of the engine's tests, whose outputs stay batch-size invariant).
MIN_WEIGHT_ELEMENTS = 1 << 20


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, w_row_stride, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """GATED: W is [gate; up], each N rows, and the program's outputs are silu(gate) * up of its
    BLOCK_N columns: its tile holds those columns' gate and up rows, interleaved."""
    if GATED:
        tile_rows = tl.arange(0, 2 * BLOCK_N)
        cols = tl.program_id(0) * BLOCK_N + tile_rows // 2
        w_row = cols + (tile_rows % 2) * N
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_row = cols
    col_ok = cols < N
    w_rows = w_ptr + w_row.to(tl.int64)[:, None] * w_row_stride
    if PDL:
        # Launched early (replicas.pdl): the weights do not depend on the previous kernel, so the
        # first tile's load goes out before the wait for x.
        tl.extra.cuda.gdc_launch_dependents()
        ks = tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        x = tl.load(x_ptr + ks, mask=ks < K, other=0.0, eviction_policy="evict_last")
        acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        start = BLOCK_K
    else:
        acc = tl.zeros(cols.shape, dtype=tl.float32)
        start = 0
    for k0 in range(start, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + ks, eviction_policy="evict_last")
        else:
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + ks, mask=ks < K, other=0.0, eviction_policy="evict_last")
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    dt = out_ptr.dtype.element_ty
    if GATED:
        # Rounded to the model dtype first, as the unfused gate_up output would be.
        gate, up = tl.split(tl.reshape(acc.to(dt).to(tl.float32), (BLOCK_N, 2)))
        out_cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + out_cols, silu_times(gate, up, dt), mask=out_cols < N)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, acc.to(dt), mask=col_ok)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv serves this product: CUDA, one row, bf16/fp16, a weight of MIN_WEIGHT_ELEMENTS
    or more, rows contiguous."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.numel() >= MIN_WEIGHT_ELEMENTS and weight.stride(1) == 1
            and x.stride(1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, block_n: int = BLOCK_N,
         block_k: int = BLOCK_K, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """x: [1, K]; weight: [N, K] with contiguous rows; bias: [N] or None. [1, N] in x's dtype."""
    return _launch(x, weight, bias, weight.shape[0], False, block_n, block_k, num_warps, num_stages)


def gemv_silu_mul(x: torch.Tensor, gate_up: torch.Tensor, *, block_n: int = GATED_BLOCK_N,
                  block_k: int = BLOCK_K, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """silu(gate) * up of gemv(x, gate_up) in one kernel, bitwise the same as the two: x: [1, K];
    gate_up: [2 * N, K], the gate's rows first. [1, N] in x's dtype."""
    return _launch(x, gate_up, None, gate_up.shape[0] // 2, True, block_n, block_k, num_warps, num_stages)


def _launch(x, weight, bias, n, gated, block_n, block_k, num_warps, num_stages) -> torch.Tensor:
    k = weight.shape[1]
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages, **pdl.launch(x))
    return out
