"""Resuming a completion on another replica (failover): the prompt plus the tokens already sent.

The resumed request's prompt is the original prompt followed by the completion's sent token ids
(an embeds prompt becomes the segmented prompt [embeds, ids]), so its KV state and its next token
are what the lost replica would have computed. Its params allow only what is left: max_tokens and
min_tokens less the tokens sent, one completion (seeded with the seed of the one it resumes), no
prompt logprobs (sent already). Seeded sampling goes on from the same output position (the engine's
`output_offset`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from replicas.detokenizer import IncrementalDetokenizer
from replicas.protocol import Continuation
from replicas.sampling_params import SamplingParams


def continuation_prompt(raw, params: SamplingParams, cont: Continuation, tokenizer):
    """(prompt, params, held text) resuming completion `cont.index` of `raw` (an engine prompt).

    held text: what the lost replica had generated but not yet released (a partial character, the
    tail that might start a stop string), to be sent before the new tokens.
    """
    ids = [int(t) for t in cont.token_ids]
    if params.max_tokens is not None and len(ids) >= params.max_tokens:
        raise ValueError(f"nothing to resume: {len(ids)} tokens sent of max_tokens {params.max_tokens}")
    if isinstance(raw, str):
        raw = {"prompt_token_ids": list(tokenizer(raw).input_ids)}
    if not isinstance(raw, dict):
        raise ValueError(f"cannot resume a prompt of type {type(raw).__name__}")
    if raw.get("prompt_token_ids") is not None:
        context = list(raw["prompt_token_ids"])
        prompt = {"prompt_token_ids": context + ids}
    elif raw.get("prompt_embeds") is not None:
        context = []
        prompt = {"prompt_segments": [raw["prompt_embeds"], ids]}
    elif raw.get("prompt_segments") is not None:
        segments = list(raw["prompt_segments"])
        context = _trailing_ids(segments)
        prompt = {"prompt_segments": segments + [ids]}
    else:
        raise ValueError("cannot resume this prompt: no prompt, token ids, embeds or segments")
    left = None if params.max_tokens is None else params.max_tokens - len(ids)
    resumed = dataclasses.replace(
        params, n=1, max_tokens=left, min_tokens=max(0, params.min_tokens - len(ids)), prompt_logprobs=None,
        seed=None if params.seed is None else params.seed + cont.index)
    return prompt, resumed, _held_text(tokenizer, context, ids, cont.text, params.skip_special_tokens)


def _trailing_ids(segments: list) -> list[int]:
    """The token ids after the last embeds block of a segmented prompt (the detokenizer's context)."""
    tail: list[int] = []
    for segment in reversed(segments):
        if isinstance(segment, (torch.Tensor, np.ndarray)):
            break
        tail = [int(t) for t in segment] + tail
    return tail


def _held_text(tokenizer, context: list[int], ids: list[int], sent: str, skip_special_tokens: bool) -> str:
    """The text of `ids` (decoded as the lost replica did, after the same context) past `sent`."""
    detok = IncrementalDetokenizer(tokenizer, context, skip_special_tokens)
    for t in ids:
        detok.push(t)
    detok.flush()
    return detok.text[len(sent):] if detok.text.startswith(sent) else ""
