"""y = x @ W.T (+ b) for a few rows (2..MAX_ROWS) on CUDA tensor cores, W streamed once.

A decode step of a few sequences is still a read of the weights: at 8 rows an 8B model's layer
does 8 multiply-adds per weight loaded, far below what the tensor cores could. cuBLAS picks
split-K tiles there that read the smaller matrices at 2.3-3.0 TB/s and add a reduce kernel per
split product (H200, `bench/gemv.py --rows`). Here, as in the one-row GEMV (replicas.models.gemv),
every program owns BLOCK_N output columns and walks the whole of K, but the product is a tensor-core
dot of its [BLOCK_N, BLOCK_K] weight tile with the rows' [BLOCK_K, BLOCK_M] (rows padded to
BLOCK_M >= 16 with masked loads), the output computed transposed, so the many weight rows fill the
dot's wide side and the few token rows its narrow one.

H200, Llama-3.1-8B (`python bench/gemv.py --skinny --tp 1 2`): one layer's four products at 8 rows,
with the MLP's SiLU-mul, 112.0 us against cuBLAS's 123.2 at TP=1 and 64.6 against 70.5 at a TP=2
rank; the LM head 235 against 241 and 120 against 126. Short of the one-row GEMV on the smaller
matrices still; splitting K over more programs (tried, with an arrival counter per tile) gained
nothing.

`skinny_gemm_silu_mul` is the MLP's gate/up product with SiLU-and-multiply applied in the same
kernel (two dots per step, the gate's and the up's tiles), bitwise the unfused pair at the same tile.

Sums are float32 in another order than cuBLAS's, so the last bit of a bf16 output may differ;
float32 models keep F.linear.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from replicas import pdl
from replicas.models.fused_pointwise import silu_times

MAX_ROWS = 32
# (block_n, block_k, num_warps, num_stages) by BLOCK_M (the rows rounded up to a power of two, 16
# at least): the best summed over the 8B layer's matrices at TP=1 and 2 (`bench/gemv.py --skinny
# --sweep`). At 64 rows cuBLAS was faster on those matrices (215 against 200 us), so MAX_ROWS is 32.
ROW_CONFIGS = {16: (64, 128, 4, 5), 32: (64, 128, 4, 5)}
# The gated kernel stages two weight tiles a step: with 5 stages and PDL's early first tiles it
# runs out of shared memory; 3 stages were within 1-2% of the best on gate_up.
GATED_ROW_CONFIGS = {16: (64, 128, 4, 3), 32: (64, 128, 4, 3)}
# The row-parallel products (o, down) have the hidden size as N: at block_n 64 that is fewer tiles
# than SMs (64 for 8B), and 32-wide tiles read them faster (8 rows, TP=1 and 2 summed: down 52.5 ->
# 46.9 us, o 18.8 -> 17.5).
MATRIX_CONFIGS = {"o": (32, 256, 4, 5), "down": (32, 256, 4, 5)}
MIN_WEIGHT_ELEMENTS = 1 << 20  # smaller weights keep F.linear, as for the one-row GEMV


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, x_row_stride, w_row_stride, out_row_stride,
                   HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """acc[BLOCK_N, BLOCK_M] = W[cols, :] @ x[rows, :].T. GATED: W is [gate; up], each N rows;
    the outputs are silu(gate) * up."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * w_row_stride
    u_rows = w_rows + N.to(tl.int64) * w_row_stride  # GATED: the up rows of the same columns
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    start = 0
    if PDL:
        # Launched early (replicas.pdl): the first weight tiles go out before the wait for x.
        tl.extra.cuda.gdc_launch_dependents()
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        if GATED:
            u = tl.load(u_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
        if GATED:
            acc_up = tl.dot(u, tl.trans(x), acc_up)
        start = BLOCK_K
    for k0 in range(start, K, BLOCK_K):
        kk = k0 + ks
        if EVEN_K:
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None], other=0.0)
            if GATED:
                u = tl.load(u_rows + kk[None, :], mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            k_ok = (kk < K)[None, :]
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok, other=0.0, eviction_policy="evict_first")
            x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
            if GATED:
                u = tl.load(u_rows + kk[None, :], mask=col_ok[:, None] & k_ok, other=0.0,
                            eviction_policy="evict_first")
        acc = tl.dot(w, tl.trans(x), acc)
        if GATED:
            acc_up = tl.dot(u, tl.trans(x), acc_up)
    _epilogue(acc, acc_up, bias_ptr, out_ptr, cols, col_ok, rows, row_ok, out_row_stride, HAS_BIAS, GATED)


@triton.jit
def _epilogue(acc, acc_up, bias_ptr, out_ptr, cols, col_ok, rows, row_ok, out_row_stride, HAS_BIAS: tl.constexpr,
              GATED: tl.constexpr):
    """The tile's sums (transposed: [columns, rows]) into out's rows."""
    dt = out_ptr.dtype.element_ty
    out = out_ptr + rows.to(tl.int64)[None, :] * out_row_stride + cols[:, None]
    mask = col_ok[:, None] & row_ok[None, :]
    if GATED:
        # Rounded to the model dtype first, as the unfused gate_up output would be.
        tl.store(out, silu_times(acc.to(dt).to(tl.float32), acc_up.to(dt).to(tl.float32), dt), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out, acc.to(dt), mask=mask)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_gemm serves this product: CUDA, 2..MAX_ROWS rows, bf16/fp16, a weight of
    MIN_WEIGHT_ELEMENTS or more, rows contiguous."""
    return (x.is_cuda and x.dim() == 2 and 2 <= x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.numel() >= MIN_WEIGHT_ELEMENTS and weight.stride(1) == 1
            and x.stride(1) == 1)


def block_m(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x: [M, K] with contiguous rows; weight: [N, K] with contiguous rows; bias: [N] or None.
    [M, N] in x's dtype. config: ROW_CONFIGS' form, theirs by default."""
    return _launch(x, weight, bias, weight.shape[0], False, config)


def skinny_gemm_silu_mul(x: torch.Tensor, gate_up: torch.Tensor,
                         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """silu(gate) * up of skinny_gemm(x, gate_up) in one kernel, bitwise the same as the two at the
    same tile (block_n, block_k and warps; stages may differ): x: [M, K]; gate_up: [2 * N, K], the
    gate's rows first. [M, N] in x's dtype.
    config: ROW_CONFIGS' form, GATED_ROW_CONFIGS' by default."""
    return _launch(x, gate_up, None, gate_up.shape[0] // 2, True, config)


def _launch(x, weight, bias, n, gated, config) -> torch.Tensor:
    m, k = x.shape
    bm = block_m(m)
    block_n, block_k, num_warps, num_stages = config or (GATED_ROW_CONFIGS if gated else ROW_CONFIGS)[bm]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, GATED=gated, BLOCK_M=bm, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x))
    return out
