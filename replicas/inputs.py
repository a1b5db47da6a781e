"""Normalises the prompt forms users send (text, token ids, embeds) into one ProcessedPrompt."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from replicas.config import ModelConfig

PLACEHOLDER_TOKEN_ID = 0  # stands in token_ids at prompt-embeds positions; never looked up


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int] | None  # None when any position is embeds
    prompt_embeds: torch.Tensor | None  # whole-prompt embeds: (seq_len, hidden) in the model dtype, on the CPU
    # Segmented prompts: every position's id (PLACEHOLDER_TOKEN_ID at embeds positions) and the
    # (first position, rows) of each embeds segment.
    segment_token_ids: list[int] | None = None
    embeds_segments: list[tuple[int, torch.Tensor]] | None = None

    @property
    def has_embeds(self) -> bool:
        return self.prompt_embeds is not None or bool(self.embeds_segments)

    @property
    def num_tokens(self) -> int:
        if self.prompt_embeds is not None:
            return self.prompt_embeds.shape[0]
        return len(self.segment_token_ids if self.segment_token_ids is not None else self.prompt_token_ids)

    @property
    def sequence_token_ids(self) -> list[int]:
        if self.prompt_embeds is not None:
            return [PLACEHOLDER_TOKEN_ID] * self.prompt_embeds.shape[0]
        return list(self.segment_token_ids if self.segment_token_ids is not None else self.prompt_token_ids)

    @property
    def context_token_ids(self) -> list[int]:
        """Token ids just before generation starts (the detokenizer's context); [] after embeds."""
        if self.prompt_token_ids is not None:
            return self.prompt_token_ids
        if self.embeds_segments:
            start, rows = self.embeds_segments[-1]
            return self.segment_token_ids[start + rows.shape[0]:]
        return []


def _embeds_tensor(value, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    expected = f"expected shape (seq_len, {hidden}) or (1, seq_len, {hidden})"
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"prompt_embeds must be a floating-point tensor, got numpy {value.dtype}; {expected}")
        value = torch.from_numpy(np.array(value, copy=True))  # the object store hands out read-only views
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a torch.Tensor or numpy array, got {type(value).__name__}; {expected}")
    if value.layout != torch.strided:
        raise ValueError(f"prompt_embeds must be a dense tensor, got layout {value.layout}; {expected}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"prompt_embeds must be floating point, got {value.dtype}; {expected}")
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 2 or value.shape[1] != hidden:
        raise ValueError(f"prompt_embeds has shape {tuple(value.shape)}; {expected}")
    if value.shape[0] == 0:
        raise ValueError(f"prompt_embeds is empty (0 rows); {expected} with seq_len >= 1")
    # Read in place when it already is a contiguous CPU tensor of the model dtype (no per-prompt copy):
    # the caller must not change it while its request runs.
    return value.detach().to(device="cpu", dtype=dtype).contiguous()


def process_prompt(prompt, tokenizer, model_cfg: ModelConfig, dtype: torch.dtype,
                   enable_prompt_embeds: bool) -> ProcessedPrompt:
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise ValueError(f"a prompt must be a string or a dict, got {type(prompt).__name__}")
    keys = [k for k in ("prompt_embeds", "prompt_token_ids", "prompt", "prompt_segments") if prompt.get(k) is not None]
    if len(keys) != 1:
        raise ValueError("a prompt dict needs exactly one of 'prompt', 'prompt_token_ids', 'prompt_embeds', "
                         "'prompt_segments'")
    kind = keys[0]
    if kind == "prompt_segments":
        if not enable_prompt_embeds:
            raise ValueError("prompt_segments given but this engine runs with enable_prompt_embeds=False")
        return _segmented(prompt["prompt_segments"], model_cfg, dtype)
    if kind == "prompt_embeds":
        if not enable_prompt_embeds:
            raise ValueError("prompt_embeds given but this engine runs with enable_prompt_embeds=False")
        return ProcessedPrompt(None, None, _embeds_tensor(prompt["prompt_embeds"], model_cfg.hidden_size, dtype))
    if kind == "prompt":
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"'prompt' must be a string, got {type(text).__name__}")
        ids = tokenizer(text).input_ids
        if not ids:
            raise ValueError("the prompt is empty")
        return ProcessedPrompt(text, list(ids), None)
    return ProcessedPrompt(None, _token_ids(prompt["prompt_token_ids"], model_cfg.vocab_size), None)


def _token_ids(ids, vocab_size: int, what: str = "prompt_token_ids") -> list[int]:
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"{what} must be a non-empty list of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise ValueError(f"token id {t!r} is out of range [0, {vocab_size})")
    return [int(t) for t in ids]


def _segmented(segments, model_cfg: ModelConfig, dtype: torch.dtype) -> ProcessedPrompt:
    """[ids, embeds rows, ids, ...]: each segment a list of token ids or a (rows, hidden) tensor/array."""
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError("prompt_segments must be a non-empty list of token-id lists and embeds tensors")
    ids: list[int] = []
    spans: list[tuple[int, torch.Tensor]] = []
    for i, segment in enumerate(segments):
        if isinstance(segment, (torch.Tensor, np.ndarray)):
            rows = _embeds_tensor(segment, model_cfg.hidden_size, dtype)
            spans.append((len(ids), rows))
            ids.extend([PLACEHOLDER_TOKEN_ID] * rows.shape[0])
        elif isinstance(segment, (list, tuple)) and not segment:
            continue  # an empty ids segment adds nothing
        else:
            ids.extend(_token_ids(segment, model_cfg.vocab_size, f"prompt_segments[{i}]"))
    if not ids:
        raise ValueError("prompt_segments holds no tokens and no embeds rows")
    if not spans:
        return ProcessedPrompt(None, ids, None)
    return ProcessedPrompt(None, None, None, ids, spans)
