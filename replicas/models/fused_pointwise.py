"""Rotary embedding and SiLU-and-multiply as one Triton kernel each on CUDA, where torch runs
five and two elementwise kernels (a decode step's layers are short enough for the launches to count).

Same arithmetic as the torch ops they replace, rounding where torch's bf16/fp16 ops round: each
product and sum is rounded to the model dtype (a no-op in float32), no multiply-add is contracted
(enable_fp_fusion off), and SiLU uses the correctly rounded exp and division torch's kernel uses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from replicas import pdl
from replicas.pdl import wait_for_previous


@triton.jit
def rotated_heads(x_row, cos_row, sin_row, at, d, mask, HALF: tl.constexpr):
    """One token's heads after the rotary embedding, as their two halves in x's dtype: x * cos +
    rotate_half(x) * sin, each product and the sum rounded to that dtype as torch's ops round them.
    at: [heads, HALF_BLOCK] element offsets of the first halves in the row; d: [1, HALF_BLOCK]."""
    x1 = tl.load(x_row + at, mask=mask, other=0.0)
    x2 = tl.load(x_row + at + HALF, mask=mask, other=0.0)
    c1 = tl.load(cos_row + d, mask=d < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + d + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + d + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)
    out2 = (a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)
    return out1.to(dt), out2.to(dt)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, x_row_stride, cos_row_stride, NUM_HEADS: tl.constexpr,
                 HEADS_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One token: out = x * cos + rotate_half(x) * sin over all its heads (q and k alike)."""
    wait_for_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_BLOCK)[:, None]
    d = tl.arange(0, HALF_BLOCK)[None, :]
    mask = (h < NUM_HEADS) & (d < HALF)
    at = h * (2 * HALF) + d
    out1, out2 = rotated_heads(x_ptr + t * x_row_stride, cos_ptr + t * cos_row_stride, sin_ptr + t * cos_row_stride,
                               at, d, mask, HALF)
    out_row = out_ptr + t * (NUM_HEADS * 2 * HALF)
    tl.store(out_row + at, out1, mask=mask)
    tl.store(out_row + at + HALF, out2, mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] (rows may be strided, each row's heads contiguous); cos, sin: [T, 1, D] in
    x's dtype. A new contiguous [T, heads, D]."""
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == dim and cos.stride(-1) == 1 and sin.stride(0) == cos.stride(0)
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        half = dim // 2
        _rope_kernel[(tokens,)](x, cos, sin, out, x.stride(0), cos.stride(0), NUM_HEADS=heads,
                                HEADS_BLOCK=triton.next_power_of_2(heads), HALF=half,
                                HALF_BLOCK=triton.next_power_of_2(half), num_warps=4, enable_fp_fusion=False,
                                **pdl.launch(x))
    return out


@triton.jit
def silu_times(g, u, dt: tl.constexpr):
    """silu(g) * u as torch computes it in dtype dt from g and u already rounded to dt (float32
    values here): silu rounded to dt, then the product rounded to dt."""
    act = libdevice.div_rn(g, 1.0 + libdevice.exp(-g)).to(dt)
    return (act.to(tl.float32) * u).to(dt)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, row_stride, WIDTH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    g = tl.load(gate_up_ptr + row * row_stride + cols, mask=mask, other=0.0)
    u = tl.load(gate_up_ptr + row * row_stride + WIDTH + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * WIDTH + cols, silu_times(g.to(tl.float32), u.to(tl.float32), g.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * width], gate first. silu(gate) * up as a new [T, width]."""
    tokens, both = gate_up.shape
    width = both // 2
    assert gate_up.stride(1) == 1
    out = torch.empty((tokens, width), dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = 1024
        _silu_mul_kernel[(tokens, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), WIDTH=width,
                                                              BLOCK=block, num_warps=4, enable_fp_fusion=False,
                                                              **pdl.launch(gate_up))
    return out
