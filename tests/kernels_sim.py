"""The model's Triton kernels on the CPU under Triton's interpreter (run with TRITON_INTERPRET=1;
tests/test_interpreted_kernels.py does): their index and rounding logic, checked without a GPU,
against the torch ops, the torch attention backend or the unfused kernels they stand in for.

Two stand-ins for the interpreter's gaps, neither touching the kernels' own logic:
- it has no libdevice, so SiLU's exp and correctly rounded division run as tl.exp and tl.div_rn
  here; the fused and unfused SiLU paths share that substitute, so their bitwise equality is still
  the kernels' own;
- it hands a load or store a mask combined with a scalar comparison (`(offs < N) & (slot >= 0)`)
  as int32 and then rejects it; such masks are made bool before the load or store, as the GPU
  takes them.
"""
from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime import interpreter

from replicas.attention import AttentionMetadata
from replicas.attention.torch_backend import TorchAttentionBackend
from replicas.attention.triton_backend import TritonAttentionBackend
from replicas.models import fused_norm, fused_pointwise, gemv, skinny_gemm
from replicas.models.llama import RMSNorm
from replicas.models.rope import apply_rope
from tests.paged_cache import paged_batch


@triton.jit
def _exp(x):
    return tl.exp(x)


@triton.jit
def _div_rn(a, b):
    return tl.div_rn(a, b)


fused_pointwise.libdevice = types.SimpleNamespace(exp=_exp, div_rn=_div_rn)


_load, _store = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store


def _bool(mask):
    return mask if mask.data.dtype == np.bool_ else interpreter.TensorHandle(mask.data.astype(np.bool_), tl.int1)


interpreter.InterpreterBuilder.create_masked_load = (
    lambda self, ptrs, mask, other, cache_policy, is_volatile: _load(self, ptrs, _bool(mask), other, cache_policy,
                                                                     is_volatile))
interpreter.InterpreterBuilder.create_masked_store = (
    lambda self, ptrs, value, mask, cache_policy: _store(self, ptrs, value, _bool(mask), cache_policy))


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


def check_attention() -> None:
    """The Triton backend (rope + KV write in one kernel, or the plain KV write of rotated keys, then
    the varlen attention kernel, split over the keys with its merge kernel when planned so) against
    the torch backend: a mixed batch
    and a split decode batch, full and sliding-window attention, GQA. Cache rows bitwise; outputs
    within float rounding. Float32 and float16 (the interpreter's bfloat16 dots are wrong)."""
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 2e-3)):
        for heads, kv_heads, head_dim in ((8, 2, 64), (6, 3, 32)):
            for window in (0, 37):
                for cases, split in (([(0, 20), (33, 1), (50, 40), (0, 1), (300, 1)], None),
                                     ([(400, 1), (40, 1)], 2)):
                    g = torch.Generator().manual_seed(0)
                    cache, meta_args = paged_batch(cases, kv_heads, head_dim, dtype, "cpu", 96, g)
                    qk = torch.randn((int(meta_args[1][-1]), heads + kv_heads, head_dim), generator=g).to(dtype)
                    v = torch.randn((qk.shape[0], kv_heads, head_dim), generator=g).to(dtype)
                    angles = torch.rand(qk.shape[0], 1, head_dim // 2) * 6
                    emb = torch.cat([angles, angles], dim=-1)
                    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
                    q, k = apply_rope(qk, cos, sin).split([heads, kv_heads], dim=1)
                    for rotary in (True, False):  # forward_rotary, or forward of rotated q and k
                        outs = []
                        for backend in (TorchAttentionBackend(),
                                        TritonAttentionBackend(heads, kv_heads, head_dim, torch.device("cpu"), 8)):
                            c = cache.clone()
                            meta = AttentionMetadata(*meta_args)
                            if split and backend.name == "triton":
                                meta.backend_state["plan"] = backend.plan(qk.shape[0], len(cases), 1,
                                                                          meta.max_seq_len, split_batch=split)
                                assert meta.backend_state["plan"].num_splits > 1
                            backend.prepare(meta)
                            scale = head_dim ** -0.5
                            out = (backend.forward_rotary(qk, v, cos, sin, c, meta, scale, window) if rotary
                                   else backend.forward(q, k, v, c, meta, scale, window))
                            outs.append((out.float(), c))
                        what = (dtype, heads, kv_heads, head_dim, window, split, rotary)
                        assert torch.equal(outs[0][1], outs[1][1]), what
                        assert (outs[0][0] - outs[1][0]).abs().max() < tol, what


def check_add_rmsnorm() -> None:
    """The fused residual add + RMSNorm against the torch path: the sum bitwise, the norm within a
    rounding; with and without a residual."""
    for dtype in (torch.float32, torch.float16):
        for hidden in (64, 576):
            norm = RMSNorm(hidden, 1e-5).to(dtype)
            torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(4))
            x, r = _rand(5, hidden, dtype=dtype), _rand(5, hidden, dtype=dtype, seed=1)
            out, summed = fused_norm.add_rmsnorm(x, norm.weight, 1e-5, r.clone())
            assert torch.equal(summed, x + r), (dtype, hidden)
            tol = 4 * torch.finfo(dtype).eps * (1 + norm(x + r).float().abs())
            assert ((out.float() - norm(x + r).float()).abs() <= tol).all(), (dtype, hidden)
            alone, same = fused_norm.add_rmsnorm(x, norm.weight, 1e-5, None)
            assert same is x and ((alone.float() - norm(x).float()).abs() <= 4 * torch.finfo(dtype).eps
                                  * (1 + norm(x).float().abs())).all(), (dtype, hidden)


def main() -> None:
    check_gemv()
    check_gemv_silu_mul()
    check_skinny_gemm()
    check_silu_mul_and_rope()
    check_attention()
    check_add_rmsnorm()
    print("kernels simulation: ok")


if __name__ == "__main__":
    main()
