"""The model's fused Triton kernels on CUDA give bitwise the torch ops they replace (rotary
embedding, SiLU-and-multiply), in bf16 and float32, for the shapes the models use."""
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
