"""RMSNorm fused with the residual add that precedes it, as one Triton kernel per call on CUDA.

Same arithmetic as the unfused torch path (and transformers): the sum is rounded to the model
dtype first, the norm runs in float32 on that rounded sum, and the weight multiplies the result
after it is cast back to the model dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from replicas import pdl
from replicas.pdl import wait_for_previous


@triton.jit
def _add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, x_row_stride, residual_row_stride,
                        out_row_stride, eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(residual_ptr + row * residual_row_stride + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    y = (xf * inv).to(x.dtype) * w
    tl.store(out_ptr + row * out_row_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """With a residual: residual += x (in place), returns (rmsnorm(residual), residual).
    Without: returns (rmsnorm(x), x)."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(rows,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), eps,
                                 HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
                                 num_warps=8 if block >= 4096 else 4, **pdl.launch(x))
    return out, res
