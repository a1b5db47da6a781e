"""The model's pointwise and GEMV Triton kernels on the CPU under Triton's interpreter (run with
TRITON_INTERPRET=1; tests/test_interpreted_kernels.py does): their index and rounding logic, checked
without a GPU, against the torch ops or the unfused kernels they stand in for.

The interpreter has no libdevice, so SiLU's exp and correctly rounded division run as tl.exp and
tl.div_rn here; the fused and unfused SiLU paths share that substitute, so their bitwise equality
is still the kernels' own.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from replicas.models import fused_pointwise, gemv, skinny_gemm
from replicas.models.rope import apply_rope


@triton.jit
def _exp(x):
    return tl.exp(x)


@triton.jit
def _div_rn(a, b):
    return tl.div_rn(a, b)


fused_pointwise.libdevice = types.SimpleNamespace(exp=_exp, div_rn=_div_rn)


def _rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_gemv() -> None:
    """Within 2 ulp of a float32 product, every config the model uses, odd N and K, bias."""
    for dtype in (torch.bfloat16, torch.float16):
        for n, k, bias in [(96, 2048, False), (37, 1100, True), (130, 3000, False)]:
            for config in [{}, *gemv.MATRIX_CONFIGS.values()]:
                x, w = _rand(1, k, dtype=dtype), _rand(n, k, dtype=dtype, seed=1) / k ** 0.5
                b = _rand(n, dtype=dtype, seed=2) if bias else None
                ref = x.float() @ w.float().T + (b.float() if bias else 0)
                out = gemv.gemv(x, w, b, **config)
                ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)
                assert out.shape == (1, n) and out.dtype == dtype
                assert ((out.float() - ref).abs() <= 2 * ulp).all(), (dtype, n, k, config)


def check_gemv_silu_mul() -> None:
    """Bitwise silu_mul(gemv(x, w)) at the default tile, and within rounding at wider ones."""
    for dtype in (torch.bfloat16, torch.float16):
        for width, k in [(96, 2048), (50, 1300)]:
            x, w = _rand(1, k, dtype=dtype), _rand(2 * width, k, dtype=dtype, seed=1) / k ** 0.5
            unfused = fused_pointwise.silu_mul(gemv.gemv(x, w))
            assert torch.equal(gemv.gemv_silu_mul(x, w), unfused), (dtype, width, k)
            wide = gemv.gemv_silu_mul(x, w, block_n=4)
            assert (wide.float() - unfused.float()).abs().max() <= 4 * torch.finfo(dtype).eps


def check_skinny_gemm() -> None:
    """Within 2 ulp of a float32 product at each row block (2..32 rows), odd N and K, bias; the gated
    variant bitwise silu_mul of the plain one. Float16 only: the interpreter's tl.dot multiplies
    bfloat16 tiles' raw bits as integers."""
    for dtype in (torch.float16,):
        for m, n, k, bias in [(2, 96, 512, False), (7, 37, 300, True), (16, 130, 1024, False), (23, 64, 256, True),
                              (32, 48, 384, False), (9, 70, 2048, True)]:
            x, w = _rand(m, k, dtype=dtype), _rand(n, k, dtype=dtype, seed=1) / k ** 0.5
            b = _rand(n, dtype=dtype, seed=2) if bias else None
            ref = x.float() @ w.float().T + (b.float() if bias else 0)
            ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)
            for config in [None, *skinny_gemm.MATRIX_CONFIGS.values()]:
                out = skinny_gemm.skinny_gemm(x, w, b, config=config)
                assert out.shape == (m, n) and out.dtype == dtype
                assert ((out.float() - ref).abs() <= 2 * ulp).all(), (dtype, m, n, k, config)
            if not bias:
                gated = skinny_gemm.skinny_gemm_silu_mul(x, w[: n // 2 * 2])
                assert torch.equal(gated, fused_pointwise.silu_mul(skinny_gemm.skinny_gemm(x, w[: n // 2 * 2]))), \
                    (dtype, m, n, k)


def check_silu_mul_and_rope() -> None:
    """Against torch's ops: bitwise in float16 and float32. The interpreter rounds to bfloat16
    otherwise than the GPU (an ulp apart at each rounding, and rope rounds twice), so bfloat16 is
    held to 2 ulp here."""
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        ulp = 0.0 if dtype != torch.bfloat16 else 2 * torch.finfo(dtype).eps
        gate_up = _rand(3, 2 * 200, dtype=dtype)
        gate, up = gate_up.split(200, dim=-1)
        out, ref = fused_pointwise.silu_mul(gate_up).float(), (F.silu(gate) * up).float()
        # exp is the interpreter's substitute here, not the GPU's correctly rounded one.
        assert ((out - ref).abs() <= (ulp + 2 * torch.finfo(dtype).eps) * ref.abs().clamp_min(1.0)).all(), dtype
        heads, dim = 6, 64
        qk = _rand(5, heads + 2, dim, dtype=dtype)[:, :heads]  # strided rows, as the qkv split hands over
        angles = _rand(5, 1, dim, dtype=torch.float32, seed=3)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        out, ref = fused_pointwise.rope(qk, cos, sin).float(), apply_rope(qk, cos, sin).float()
        assert ((out - ref).abs() <= ulp * ref.abs().clamp_min(1.0)).all(), dtype


def main() -> None:
    check_gemv()
    check_gemv_silu_mul()
    check_skinny_gemm()
    check_silu_mul_and_rope()
    print("kernels simulation: ok")


if __name__ == "__main__":
    main()
