"""Rotary position embeddings, with the rope scaling types transformers knows (llama3, linear, yarn, ...)."""
from __future__ import annotations

import torch

from replicas.models import kernel_module


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        return inv_freq, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))


class RotaryEmbedding(torch.nn.Module):
    """A cos/sin table over every position up to max_positions, looked up per token."""

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = rope_inv_freq(hf_config, head_dim)  # built on the CPU; the runner moves the model
        inv_freq = inv_freq.to("cpu", torch.float32)
        positions = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope over queries and keys together ([T, heads, D], one pass); on CUDA one Triton
    kernel where triton imports."""
    kernels = kernel_module("fused_pointwise") if qk.is_cuda else None
    return kernels.rope(qk, cos, sin) if kernels is not None else apply_rope(qk, cos, sin)
