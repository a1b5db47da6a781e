"""A chat request -> the one prompt its replica runs.

Messages are checked part by part, every `prompt_embeds` part goes through the same safe decoder
and size cap as `/v1/completions` embeds (router.embeds; base64 in JSON, raw torch.save bytes or a
raw {dtype, shape, data} map in msgpack), the model's chat template is rendered around the parts
(replicas.chat_template), and the result is packed for the handle call: plain token ids for a
text-only chat, else segments whose embeds rows travel stacked as one object-store array.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from replicas.chat_template import ChatError, check_template_kwargs, parse_messages, render_segments, segments_length
from replicas.deployment import ModelInfo
from replicas.segments import pack_segments
from router.chat_schemas import ChatCompletionRequest
from router.embeds import decode_embeds_entry
from router.errors import APIError, bad_request
from router.routing import prefix_keys


@dataclass
class ChatPrompt:
    token_ids: list[int] | None  # a text-only chat
    segments: list | None  # else: token-id lists and row counts of `embeds`
    embeds: np.ndarray | None  # every embeds part's rows, stacked in order
    num_tokens: int
    prefix_keys: list[str]


def build_chat_prompt(req: ChatCompletionRequest, tokenizer, info: ModelInfo, *, max_tokens: int | None,
                      max_embeds_bytes: int | None) -> ChatPrompt:
    """Runs in a worker thread (decoding, rendering and tokenizing take a while for long chats)."""
    try:
        template_kwargs = check_template_kwargs(req.chat_template_kwargs)
    except ValueError as e:
        raise bad_request(str(e), "chat_template_kwargs") from None
    decode = functools.partial(decode_embeds_entry, hidden_size=info.hidden_size,
                               max_bytes=max_embeds_bytes or info.max_model_len * info.hidden_size * 4)
    try:
        messages = parse_messages(req.messages, decode, max_rows=info.max_model_len - (max_tokens or 1))
        segments = render_segments(tokenizer, messages, add_generation_prompt=req.add_generation_prompt,
                                   template_kwargs=template_kwargs)
    except ChatError as e:
        raise APIError(e.message, e.status, param="messages") from None
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    wire, embeds = pack_segments(segments)
    lead = wire[0] if wire and isinstance(wire[0], list) else []  # affinity: the token ids before any embeds
    if embeds is None:
        ids = [t for s in wire for t in s]
        return ChatPrompt(ids, None, None, len(ids), prefix_keys(ids))
    return ChatPrompt(None, wire, embeds, segments_length(segments), prefix_keys(lead))
