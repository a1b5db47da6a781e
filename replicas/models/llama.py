"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Inputs are one flattened batch of T tokens; each row is either a looked-up token id or a
caller-supplied embedding row (prompt embeds), chosen by a per-token mask.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from replicas.attention import AttentionBackend, AttentionMetadata
from replicas.config import ModelConfig
from replicas.models import kernel_module
from replicas.models.rope import RotaryEmbedding

if TYPE_CHECKING:
    from replicas.parallel.shard import TensorShard


# Row counts at which MKL's `weight @ x.T` kernel ran fastest for a few rows (2-core EPYC,
# torch 2.13, SmolLM2 shapes, weights streamed from memory): 1 row takes a single-threaded
# GEMV and 9-15 rows a slow path, so those are padded up. Larger batches keep F.linear.
_CPU_PADDED_ROWS = [0, 2, 2, 3, 4, 5, 6, 7, 8] + [16] * 8 + [32] * 16 + [48] * 16


def linear(x: torch.Tensor, layer: nn.Module, matrix: str = "") -> torch.Tensor:
    """nn.Linear's math; on CUDA in bf16/fp16, one row takes the GEMV kernel and a few rows the
    skinny GEMM (each with its config for `matrix`, where it has one), and on the CPU decode-sized
    batches take the faster `weight @ x.T` layout."""
    bias = getattr(layer, "bias", None)  # the tied head is an nn.Embedding
    rows = x.shape[0]
    if x.device.type != "cpu":
        gemv, skinny = _weight_streaming_kernels(x)
        if gemv is not None and gemv.fits(x, layer.weight):
            return gemv.gemv(x, layer.weight, bias, **gemv.MATRIX_CONFIGS.get(matrix, {}))
        if skinny is not None and skinny.fits(x, layer.weight):
            return skinny.skinny_gemm(x, layer.weight, bias, config=skinny.MATRIX_CONFIGS.get(matrix))
        return F.linear(x, layer.weight, bias)
    if rows >= len(_CPU_PADDED_ROWS):
        return F.linear(x, layer.weight, bias)
    padded = _CPU_PADDED_ROWS[rows]
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    # Row-major x (elementwise ops on an earlier transposed result would hand over column-major),
    # and a row-major result: MKL's fast path for this layout needs both.
    out = torch.mm(layer.weight, x.contiguous().t()).t()[:rows].contiguous()
    return out + bias if bias is not None else out


def _weight_streaming_kernels(x: torch.Tensor):
    """(replicas.models.gemv, replicas.models.skinny_gemm) for a CUDA x; (None, None) on other
    devices, where triton is missing, or with RAYLM_GEMV=0 (F.linear throughout)."""
    return _cuda_weight_kernels() if x.is_cuda else (None, None)


@functools.cache
def _cuda_weight_kernels():
    if os.environ.get("RAYLM_GEMV", "1") == "0":
        return None, None
    return kernel_module("gemv"), kernel_module("skinny_gemm")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                 group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual), x + residual); residual None: (rmsnorm(x), x). On CUDA one fused
        kernel that may update `residual` in place. group: x is this rank's partial sum, summed over
        the group first (with the add and norm in the same kernel on the peer-memory path)."""
        if group is not None:
            reduced = group.fused_all_reduce_add_rmsnorm(x, residual, self.weight, self.eps)
            if reduced is not None:
                return reduced
            group.all_reduce(x)
        fused = kernel_module("fused_norm") if x.is_cuda else None
        if fused is not None:
            return fused.add_rmsnorm(x, self.weight, self.eps, residual)
        residual = x if residual is None else x + residual
        return self(residual), residual


class Attention(nn.Module):
    """cfg: the heads this rank holds."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5
        self.window = 0  # sliding window (0: full attention), set per layer by LlamaForCausalLM
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        qk, v = linear(x, self.qkv_proj, "qkv").split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = backend.forward_rotary(qk, v, cos, sin, kv_cache, meta, self.scale, self.window)
        # Row-parallel under tensor parallel: each rank's heads give a partial sum, summed by the
        # norm that follows (DecoderLayer).
        return linear(out.reshape(-1, self.q_size), self.o_proj, "o")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        # One row (the GEMV) or a few (the skinny GEMM): the activation comes out of the gate/up
        # product's kernel itself, one kernel fewer.
        gemv, skinny = _weight_streaming_kernels(x)
        if gemv is not None and gemv.fits(x, self.gate_up_proj.weight):
            return linear(gemv.gemv_silu_mul(x, self.gate_up_proj.weight), self.down_proj, "down")
        if skinny is not None and skinny.fits(x, self.gate_up_proj.weight):
            return linear(skinny.skinny_gemm_silu_mul(x, self.gate_up_proj.weight), self.down_proj, "down")
        gate_up = linear(x, self.gate_up_proj)
        kernels = kernel_module("fused_pointwise") if gate_up.is_cuda else None
        if kernels is not None:
            act = kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            act = F.silu(gate) * up
        return linear(act, self.down_proj, "down")  # a partial sum under tensor parallel, like o_proj's


class DecoderLayer(nn.Module):
    """group: tensor parallel's collectives (None on one device). The attention and MLP outputs
    are then each rank's partial sums; the norm after each sums them over the ranks."""

    def __init__(self, cfg: ModelConfig, group=None):
        super().__init__()
        self.group = group
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, meta, backend):
        """x: the previous layer's output, a partial sum under tensor parallel (the first layer's: the
        embeddings, whole, with residual None); residual: the stream before it."""
        h, residual = self.input_layernorm.add_norm(x, residual, self.group if residual is not None else None)
        h = self.self_attn(h, cos, sin, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm.add_norm(h, residual, self.group)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """shard: tensor parallel (replicas.parallel.shard): cfg is then this rank's shape, the embedding
    and LM head hold its vocabulary rows, and the layers sum their partial outputs over the ranks."""

    def __init__(self, cfg: ModelConfig, shard: "TensorShard | None" = None):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        group = shard.group if shard is not None else None
        vocab_rows = shard.vocab_rows if shard is not None else cfg.vocab_size
        self.embed_tokens = nn.Embedding(vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, group) for _ in range(cfg.num_layers))
        for layer, window in zip(self.layers, cfg.layer_windows):
            layer.self_attn.window = window
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab_rows, bias=False)
        self.rotary = RotaryEmbedding(cfg.hf_config, cfg.head_dim, cfg.max_model_len)

    def embed(self, input_ids: torch.Tensor, embeds_index: torch.Tensor | None = None,
              embeds_rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Input hidden states: looked-up token rows, with supplied embedding rows placed at embeds_index.
        `out`: a static buffer (a captured graph's input) to write into."""
        if self.shard is not None:
            return self._embed_sharded(input_ids, embeds_index, embeds_rows, out)
        if out is None:
            x = self.embed_tokens(input_ids)
        else:
            x = torch.index_select(self.embed_tokens.weight, 0, input_ids, out=out)
        if embeds_index is not None:
            x.index_copy_(0, embeds_index, embeds_rows.to(x.dtype))
        return x

    def _embed_sharded(self, input_ids, embeds_index, embeds_rows, out):
        """Vocab-parallel lookup: rank 0 holds the step's ids (some sampled on its device and not read
        back yet) and sends them to the others; each rank looks up the ids in its rows (zeros
        elsewhere) and an all-reduce sums them. Supplied embeds rows ride the same all-reduce: rank 0
        places them, the others contribute zeros there, so no other rank needs the embeds."""
        s = self.shard
        s.group.broadcast(input_ids)
        local = input_ids - s.vocab.start
        outside = (local < 0) | (local >= s.vocab.size)
        local = local.masked_fill(outside, 0)
        if out is None:
            x = self.embed_tokens(local)
        else:
            x = torch.index_select(self.embed_tokens.weight, 0, local, out=out)
        x.masked_fill_(outside[:, None], 0)
        if embeds_index is not None:
            if s.rank == 0:
                x.index_copy_(0, embeds_index, embeds_rows.to(x.dtype))
            else:
                x.index_fill_(0, embeds_index, 0)
        s.group.all_reduce(x)
        return x

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """x: [T, hidden] input hidden states (see embed). Returns the final-norm hidden states."""
        cos, sin = self.rotary.lookup(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, backend)
        group = self.shard.group if self.shard is not None else None
        return self.norm.add_norm(x, residual, group if residual is not None else None)[0]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        head = self.lm_head if self.lm_head is not None else self.embed_tokens
        logits = linear(hidden, head)
        if self.shard is not None:  # vocab-parallel: every rank's columns, joined
            logits = self.shard.gather_logits(logits)
        return logits.float() if float32 else logits

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face parameter names, fusing q/k/v and gate/up projections."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()
        names = {k.removeprefix("model."): k for k in state}  # `state` may load each tensor on access

        def get(name: str) -> torch.Tensor:
            return state[names.get(name, name)]

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if self.shard is not None:
                tensor = self.shard.take(name, tensor)
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)

        for i in range(self.cfg.num_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                parts = [f"{p}self_attn.{n}_proj.{kind}" for n in "qkv"]
                if all(n in names for n in parts):
                    put(f"{p}self_attn.qkv_proj.{kind}", torch.cat([get(n) for n in parts], 0))
            put(f"{p}mlp.gate_up_proj.weight",
                torch.cat([get(f"{p}mlp.gate_proj.weight"), get(f"{p}mlp.up_proj.weight")], 0))
            layer_names = ["self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                           "post_attention_layernorm.weight"]
            if self.cfg.qk_norm:
                layer_names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
            for name in layer_names:
                put(p + name, get(p + name))
        put("embed_tokens.weight", get("embed_tokens.weight"))
        put("norm.weight", get("norm.weight"))
        if self.lm_head is not None:
            put("lm_head.weight", get("lm_head.weight") if "lm_head.weight" in names else get("embed_tokens.weight"))
        missing = set(own) - loaded
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:5]}")

    def init_dummy_weights(self, seed: int) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                gen = torch.Generator(device=param.device).manual_seed(seed)
                seed += 1
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                elif self.shard is not None:  # this rank's piece of what one device would draw
                    shape = self.shard.full_shape(name, param.shape)
                    full = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(0.0, 0.02, generator=gen)
                    param.copy_(self.shard.take(name, full))
                else:
                    param.normal_(0.0, 0.02, generator=gen)
