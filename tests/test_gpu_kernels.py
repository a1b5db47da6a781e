"""The model's fused Triton kernels on CUDA give bitwise the torch ops they replace (rotary
embedding, SiLU-and-multiply), in bf16 and float32, for the shapes the models use; the one-row
GEMV and the few-row skinny GEMM give a float32 product rounded to the model dtype."""
import os

import pytest
import torch
import torch.nn.functional as F

from replicas.models.rope import apply_rope

pytestmark = pytest.mark.gpu


def _rand(*shape, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen, device="cuda")).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 4, 64), (7, 1, 80), (3, 3, 64)])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rope_kernel_equals_torch(dtype, heads, kv_heads, head_dim, tokens):
    from replicas.models.fused_pointwise import rope

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _rand(tokens, q_size + 2 * kv_size, dtype=dtype)
    # As the attention layer hands it over: the q and k columns of the projection, rows strided.
    qk = qkv[:, :q_size + kv_size].reshape(-1, heads + kv_heads, head_dim)
    angles = _rand(tokens, head_dim // 2, dtype=torch.float32, seed=1)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    assert torch.equal(rope(qk, cos, sin), apply_rope(qk, cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,width", [(1, 14336), (7, 1000), (256, 8192)])
def test_silu_mul_kernel_equals_torch(dtype, tokens, width):
    from replicas.models.fused_pointwise import silu_mul

    gate_up = _rand(tokens, 2 * width, dtype=dtype)
    gate, up = gate_up.split(width, dim=-1)
    assert torch.equal(silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,bias", [(3072, 4096, False), (4096, 7168, False), (4096, 3584, False), (1000, 1100, True),
                                      (37, 3000, True)])
@pytest.mark.parametrize("matrix", ["", "qkv"])
def test_gemv_matches_a_float32_product(dtype, n, k, bias, matrix):
    """Within the model dtype's rounding of a float32 product (its sums run in another order than
    cuBLAS's, so equality with F.linear is not the contract), with the default config and each
    per-matrix one."""
    from replicas.models.gemv import MATRIX_CONFIGS, gemv

    x, w = _rand(1, k, dtype=dtype), _rand(n, k, dtype=dtype, seed=1) / k ** 0.5
    b = _rand(n, dtype=dtype, seed=2) if bias else None
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    out = gemv(x, w, b, **MATRIX_CONFIGS.get(matrix, {}))
    assert out.dtype == dtype and out.shape == (1, n)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)
    assert ((out.float() - ref).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,k", [(14336, 4096), (7168, 4096), (1000, 3000)])
def test_gate_up_gemv_with_silu_equals_gemv_then_silu_mul(dtype, width, k):
    """The MLP's one-row gate/up product with the activation in the same kernel gives bitwise the
    unfused path's result (the GEMV's output rounded, then silu_mul's arithmetic)."""
    from replicas.models.fused_pointwise import silu_mul
    from replicas.models.gemv import gemv, gemv_silu_mul

    x, w = _rand(1, k, dtype=dtype), _rand(2 * width, k, dtype=dtype, seed=1) / k ** 0.5
    out = gemv_silu_mul(x, w)
    assert out.shape == (1, width) and out.dtype == dtype
    assert torch.equal(out, silu_mul(gemv(x, w)))


def test_linear_routes_one_row_to_the_gemv_kernel():
    from torch import nn

    from replicas.models import gemv
    from replicas.models.llama import linear

    layer = nn.Linear(2048, 1024, bias=False).to("cuda", torch.bfloat16)
    x = _rand(1, 2048, dtype=torch.bfloat16)
    assert gemv.fits(x, layer.weight) and not gemv.fits(_rand(2, 2048, dtype=torch.bfloat16), layer.weight)
    assert torch.equal(linear(x, layer), gemv.gemv(x, layer.weight))
    assert torch.equal(linear(x, layer, "qkv"), gemv.gemv(x, layer.weight, **gemv.MATRIX_CONFIGS["qkv"]))
    assert not gemv.fits(x.float(), layer.weight.float())  # float32 keeps F.linear
    small = nn.Linear(64, 64, bias=False).to("cuda", torch.bfloat16)
    assert not gemv.fits(x[:, :64], small.weight)  # an L2-sized weight keeps F.linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 5, 16, 17, 32])
@pytest.mark.parametrize("n,k,bias", [(3072, 4096, False), (4096, 2048, False), (1000, 1100, True), (37, 3000, True)])
@pytest.mark.parametrize("matrix", ["", "down"])
def test_skinny_gemm_matches_a_float32_product(dtype, rows, n, k, bias, matrix):
    """Within the model dtype's rounding of a float32 product at each row block (16, 32), with the
    default configs and a per-matrix one."""
    from replicas.models.skinny_gemm import MATRIX_CONFIGS, skinny_gemm

    x, w = _rand(rows, k, dtype=dtype), _rand(n, k, dtype=dtype, seed=1) / k ** 0.5
    b = _rand(n, dtype=dtype, seed=2) if bias else None
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    out = skinny_gemm(x, w, b, config=MATRIX_CONFIGS.get(matrix))
    assert out.dtype == dtype and out.shape == (rows, n)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)
    assert ((out.float() - ref).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [2, 8, 31])
@pytest.mark.parametrize("width,k", [(14336, 4096), (7168, 4096), (1000, 3000)])
def test_gate_up_skinny_gemm_with_silu_equals_skinny_gemm_then_silu_mul(dtype, rows, width, k):
    from replicas.models.fused_pointwise import silu_mul
    from replicas.models.skinny_gemm import skinny_gemm, skinny_gemm_silu_mul

    x, w = _rand(rows, k, dtype=dtype), _rand(2 * width, k, dtype=dtype, seed=1) / k ** 0.5
    out = skinny_gemm_silu_mul(x, w)
    assert out.shape == (rows, width) and out.dtype == dtype
    assert torch.equal(out, silu_mul(skinny_gemm(x, w)))


def test_linear_and_mlp_route_a_few_rows_to_the_skinny_gemm():
    from types import SimpleNamespace

    from torch import nn

    from replicas.models import skinny_gemm
    from replicas.models.fused_pointwise import silu_mul
    from replicas.models.llama import MLP, linear

    layer = nn.Linear(2048, 1024, bias=False).to("cuda", torch.bfloat16)
    for rows in (2, 8, 32):
        x = _rand(rows, 2048, dtype=torch.bfloat16)
        assert skinny_gemm.fits(x, layer.weight)
        assert torch.equal(linear(x, layer), skinny_gemm.skinny_gemm(x, layer.weight))
        assert torch.equal(linear(x, layer, "down"),
                           skinny_gemm.skinny_gemm(x, layer.weight, config=skinny_gemm.MATRIX_CONFIGS["down"]))
    assert not skinny_gemm.fits(_rand(1, 2048, dtype=torch.bfloat16), layer.weight)  # one row: the GEMV
    assert not skinny_gemm.fits(_rand(33, 2048, dtype=torch.bfloat16), layer.weight)  # more: cuBLAS
    assert not skinny_gemm.fits(_rand(8, 2048, dtype=torch.float32), layer.weight.float())
    mlp = MLP(SimpleNamespace(hidden_size=2048, intermediate_size=1024)).to("cuda", torch.bfloat16)
    x = _rand(8, 2048, dtype=torch.bfloat16) / 3
    unfused = linear(silu_mul(skinny_gemm.skinny_gemm(x, mlp.gate_up_proj.weight)), mlp.down_proj)
    assert torch.equal(mlp(x), unfused)


@pytest.mark.parametrize("rows", [1, 8])
def test_chain_with_programmatic_dependent_launch_equals_plain_launches(monkeypatch, rows):
    """Kernels launched with PDL (replicas/pdl.py) start before the kernel they read from has
    finished; each must wait for its input. A chain of them (one row: the GEMV; 8: the skinny
    GEMM), replayed as a CUDA graph, gives bitwise the results of plain launches (a missed wait
    reads a stale row)."""
    from replicas import pdl
    from replicas.models.fused_norm import add_rmsnorm
    from replicas.models.fused_pointwise import silu_mul
    from replicas.models.gemv import gemv, gemv_silu_mul
    from replicas.models.skinny_gemm import skinny_gemm, skinny_gemm_silu_mul

    hidden, layers = 4096, 12
    weights = [_rand(2 * hidden, hidden, dtype=torch.bfloat16, seed=10 + i) / hidden ** 0.5 for i in range(layers)]
    norm = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    x0 = _rand(rows, hidden, dtype=torch.bfloat16)
    product, fused = (gemv, gemv_silu_mul) if rows == 1 else (skinny_gemm, skinny_gemm_silu_mul)
    monkeypatch.setattr(pdl, "max_rows", lambda: rows)

    def chain(x):
        residual = None
        for i, w in enumerate(weights):
            h, residual = add_rmsnorm(x, norm, 1e-5, residual)
            x = fused(h, w) if i % 2 else silu_mul(product(h, w))
        return x, residual

    def replayed():
        x = x0.clone()
        chain(x)  # compile and warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x)
        results = []
        for _ in range(5):
            graph.replay()
            results.append(torch.cat(out, dim=1).clone())
        return results

    if torch.cuda.get_device_capability()[0] >= 9 and os.environ.get("RAYLM_PDL", "1") != "0":
        assert pdl.launch(x0).get("launch_pdl") is True
    with_pdl = replayed()
    monkeypatch.setattr(pdl, "launch", lambda tensor: {"PDL": False})
    plain = replayed()
    for a, b in zip(with_pdl, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (16, 4, 128), (14, 2, 64)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rope_and_kv_write_in_one_kernel_equal_the_two_kernels(dtype, heads, kv_heads, head_dim, tokens):
    """The Triton backend's forward_rotary pass (rope_store_kv_kernel) writes bitwise the rotated
    queries and cache rows of the rope kernel followed by store_kv_kernel; padding rows (slot -1)
    write no cache row."""
    from replicas.attention.triton_backend import _next_pow2
    from replicas.attention.triton_kernels import rope_store_kv_kernel, store_kv_kernel
    from replicas.models.fused_pointwise import rope

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _rand(tokens, q_size + 2 * kv_size, dtype=dtype)
    qk = qkv[:, :q_size + kv_size].reshape(-1, heads + kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:]
    angles = _rand(tokens, head_dim // 2, dtype=torch.float32, seed=1)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    slots = torch.randperm(4 * tokens, device="cuda")[:tokens]
    slots[-1] = -1
    caches = [torch.zeros(2, 4 * tokens, kv_size, dtype=dtype, device="cuda") for _ in range(2)]
    v_half = caches[0][1].storage_offset() - caches[0][0].storage_offset()

    rotated = rope(qk, cos, sin)
    k = rotated[:, heads:].reshape(tokens, kv_size)
    store_kv_kernel[(tokens,)](k, v, caches[0], slots, k.stride(0), v.stride(0), v_half, ROW=kv_size,
                               BLOCK=_next_pow2(kv_size), PDL=False, num_warps=4)
    q = torch.empty(tokens, heads, head_dim, dtype=dtype, device="cuda")
    rope_store_kv_kernel[(tokens,)](qk, v, cos, sin, q, caches[1], slots, qk.stride(0), v.stride(0), cos.stride(0),
                                    v_half, NUM_HEADS=heads, NUM_KV_HEADS=kv_heads,
                                    HEADS_BLOCK=_next_pow2(heads + kv_heads), HALF=head_dim // 2,
                                    HALF_BLOCK=_next_pow2(head_dim // 2), ROW_BLOCK=_next_pow2(kv_size), PDL=False,
                                    num_warps=4, enable_fp_fusion=False)
    assert torch.equal(q, rotated[:, :heads])
    assert torch.equal(caches[1], caches[0])
    if tokens > 1:
        assert caches[1][:, slots[:-1]].abs().sum() > 0
