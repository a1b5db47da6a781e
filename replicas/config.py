"""Engine and model configuration: what the engine was asked for, resolved against the model."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}

# Ray's placement-group strategies: STRICT_PACK keeps a tensor-parallel group on one node, the
# others let its bundles span nodes.
PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class EngineConfig:
    """The keyword arguments of `cluster.LLM` (vLLM's names where vLLM has one)."""

    model: str | None = None
    enable_prompt_embeds: bool = True
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    load_format: str = "auto"  # "auto" | "dummy"
    seed: int = 0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float = 1.0  # the CPU's KV budget
    tokenizer: str | None = None
    served_model_name: str | None = None
    num_threads: int | None = None  # torch intra-op threads on the CPU (default: as many as cpu_affinity names)
    # Cores the engine's process is held to ("0-7,12" or ids; replicas.cpu_affinity): the replica's engine
    # process, or the caller's process for an offline LLM; rank 0's under tensor parallel.
    cpu_affinity: str | list[int] | None = None
    attention_backend: str | None = None  # None: "triton" on CUDA, "torch" (the reference) elsewhere
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    # Tensor parallelism: the model sharded over this many devices (a Ray placement group of that
    # many bundles, rank 0 in this process); STRICT_PACK keeps every bundle on one node.
    tensor_parallel_size: int = 1
    placement_group_strategy: str = "STRICT_PACK"
    # Debug: check the KV accounting (kv.check_integrity) whenever the engine goes idle; fails loudly.
    check_kv_integrity: bool = field(default_factory=lambda: os.environ.get("RAYLM_CHECK_KV") == "1")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine arguments: {', '.join(unknown)}")
        cfg = cls(**kwargs)
        cfg.check_parallel()
        return cfg

    def check_parallel(self) -> None:
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {self.tensor_parallel_size!r}")
        if self.placement_group_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_group_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_group_strategy!r}")

    def resolve_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype in (None, "auto"):
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            return _DTYPES[str(self.dtype).lower()]
        except KeyError:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


@dataclass
class ModelConfig:
    """The shape of a Llama-family model, read from a Hugging Face config."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's queries and keys before rope
    max_position_embeddings: int
    max_model_len: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    hf_config: object  # transformers PretrainedConfig, for rope parameters
    # Per layer, the sliding attention window (a query at position p sees keys after p - window);
    # 0 for full attention. Empty: every layer full.
    layer_windows: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf_config, name: str, max_model_len: int | None) -> "ModelConfig":
        c = hf_config
        model_type = getattr(c, "model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"unsupported model_type {model_type!r}: raylm runs llama, mistral, qwen2 and qwen3")
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        eos = c.eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        max_pos = getattr(c, "max_position_embeddings", 4096)
        if max_model_len is None:
            max_model_len = max_pos
        elif max_model_len > max_pos:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {max_pos}")
        return cls(
            name=name,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=max_pos,
            max_model_len=max_model_len,
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids,
            hf_config=c,
            layer_windows=_layer_windows(c, model_type),
        )


def _layer_windows(c, model_type: str) -> tuple[int, ...]:
    """Each layer's attention window (0: full): Mistral's sliding_window on every layer; Qwen2/3's
    (when use_sliding_window) on the layers its layer_types mark sliding."""
    window = int(getattr(c, "sliding_window", None) or 0)
    if model_type in ("qwen2", "qwen3") and not getattr(c, "use_sliding_window", False):
        window = 0
    if not window:
        return ()
    types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
    return tuple(window if t == "sliding_attention" else 0 for t in types)
