"""A tiny random-weight Llama (dummy weights, the embedded tokenizer): an engine in a second."""
from __future__ import annotations

import json
from pathlib import Path

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
              "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-5}

# Engine options for it: dummy weights, a small KV cache, one thread (the test machine has 2 cores).
TINY_ENGINE = {"load_format": "dummy", "max_model_len": 1024, "kv_cache_memory_gb": 0.02, "num_threads": 1}


def tiny_config(folder: Path) -> str:
    """Write the tiny model's config.json under `folder`; return its path (the `model` argument)."""
    path = Path(folder) / "tiny-llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)
