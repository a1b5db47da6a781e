"""Chat messages -> the prompt the model's chat template makes of them, embeds parts spliced in.

A message's `content` is a string or a list of parts, `{"type": "text", "text": ...}` and
`{"type": "prompt_embeds", "data": ...}` (vLLM's shape). The parts of a message are joined with
"\\n" (as vLLM joins text parts); an embeds part stands in that text as a placeholder string of
ours, the template is rendered, and the result is cut at the placeholders: the text between them
is tokenized piece by piece and each part's rows go in at its placeholder's place. Text that
contains our placeholder mark is refused, so a client cannot forge a splice point.

Shared by the HTTP router (embeds data decoded from base64 / msgpack bytes) and the offline
`LLM.chat` / cluster client (tensors); the caller says how a part's `data` becomes rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

TEXT_PART, EMBEDS_PART = "text", "prompt_embeds"
ROLES = ("system", "developer", "user", "assistant", "tool")
PART_SEPARATOR = "\n"
MAX_PARTS_PER_MESSAGE = 256
MAX_MESSAGES = 4096
PLACEHOLDER_MARK = "<|raylm_prompt_embeds"  # any text holding this is refused
_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER_MARK) + r"_(\d+)\|>")
# apply_chat_template's own arguments: not template variables a caller may set
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "messages", "processor_kwargs"})


class ChatError(ValueError):
    """A message or part the chat prompt cannot be built from; names where it is."""

    def __init__(self, detail: str, message_index: int | None = None, part_index: int | None = None,
                 status: int = 400):
        where = "messages" if message_index is None else f"messages[{message_index}]"
        if part_index is not None:
            where += f".content[{part_index}]"
        super().__init__(f"{where}: {detail}")
        self.message = f"{where}: {detail}"
        self.message_index, self.part_index, self.status = message_index, part_index, status


@dataclass
class ChatMessage:
    role: str
    pieces: list  # in order: str text, or the rows (a tensor or array) of an embeds part
    name: str | None = None


def _type_name(value: Any) -> str:
    return type(value).__name__


def _text(value: Any, what: str, m: int, p: int | None) -> str:
    if not isinstance(value, str):
        raise ChatError(f"{what} must be a string, got {_type_name(value)}", m, p)
    if PLACEHOLDER_MARK in value:
        raise ChatError(f"{what} contains {PLACEHOLDER_MARK!r}, which this server reserves for "
                        "prompt_embeds parts", m, p)
    return value


def parse_messages(messages: Any, embeds_of: Callable[[Any], Any], *,
                   max_parts: int = MAX_PARTS_PER_MESSAGE, max_rows: int | None = None) -> list[ChatMessage]:
    """Check every message and part; `embeds_of(data)` turns a part's data into rows (it raises
    ValueError for a bad one, with a `status` attribute where the status is not 400). Embeds rows
    add up across the messages and may not pass `max_rows`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"has {len(messages)} messages; at most {MAX_MESSAGES}")
    out, rows = [], 0
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatError(f"a message must be an object, got {_type_name(msg)}", m)
        role = msg.get("role")
        if role not in ROLES:
            raise ChatError(f"role must be one of {', '.join(ROLES)}; got {str(role)[:32]!r}", m)
        name = msg.get("name")
        if name is not None:
            name = _text(name, "name", m, None)
        content = msg.get("content")
        if content is None:
            if role != "assistant":
                raise ChatError("content is required", m)
            pieces = []
        elif isinstance(content, str):
            pieces = [_text(content, "content", m, None)]
        elif isinstance(content, (list, tuple)):
            if len(content) > max_parts:
                raise ChatError(f"has {len(content)} content parts; at most {max_parts} per message", m)
            pieces = []
            for p, part in enumerate(content):
                piece = _part(part, embeds_of, m, p)
                if not isinstance(piece, str):
                    rows += int(piece.shape[0])
                    if max_rows is not None and rows > max_rows:
                        raise ChatError(f"the prompt_embeds parts up to here have {rows} rows, more than the "
                                        f"{max_rows} this request leaves room for", m, p)
                pieces.append(piece)
        else:
            raise ChatError(f"content must be a string or a list of parts, got {_type_name(content)}", m)
        out.append(ChatMessage(role, pieces, name))
    return out


def _part(part: Any, embeds_of: Callable[[Any], Any], m: int, p: int):
    if not isinstance(part, dict):
        raise ChatError(f"a content part must be an object, got {_type_name(part)}", m, p)
    kind = part.get("type")
    if kind == TEXT_PART:
        return _text(part.get("text"), "text", m, p)
    if kind == EMBEDS_PART:
        data = part.get("data")
        if data is None or (isinstance(data, (str, bytes)) and not data):
            raise ChatError("prompt_embeds content part requires a non-empty `data` field (base64 of "
                            "torch.save bytes; a tensor offline)", m, p)
        try:
            return embeds_of(data)
        except ValueError as e:
            raise ChatError(str(e), m, p, getattr(e, "status", 400)) from None
    raise ChatError(f"unknown content part type {str(kind)[:32]!r}; expected {TEXT_PART!r} or {EMBEDS_PART!r}",
                    m, p)


def check_template_kwargs(kwargs: Any) -> dict:
    """Extra template variables (e.g. Qwen3's enable_thinking); never apply_chat_template's own arguments."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError("chat_template_kwargs must be an object with string keys")
    reserved = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    return dict(kwargs)


def render_segments(tokenizer, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                    chat_template: str | None = None, template_kwargs: dict | None = None) -> list:
    """`[ids, rows, ids, ...]`: the rendered chat template's token ids with each embeds part's rows
    at its place (empty id runs left out). Raises ValueError when the template fails."""
    conversation, blocks = [], []
    for msg in messages:
        texts = []
        for piece in msg.pieces:
            if isinstance(piece, str):
                texts.append(piece)
            else:
                texts.append(f"{PLACEHOLDER_MARK}_{len(blocks)}|>")
                blocks.append(piece)
        entry = {"role": msg.role, "content": PART_SEPARATOR.join(texts)}
        if msg.name is not None:
            entry["name"] = msg.name
        conversation.append(entry)
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, **check_template_kwargs(template_kwargs))
    except Exception as e:  # noqa: BLE001 - a template may raise anything (raise_exception, jinja errors)
        raise ValueError(f"the chat template cannot render these messages: {type(e).__name__}: "
                         f"{str(e)[:200]}") from None
    pieces = _PLACEHOLDER.split(text)  # text, index, text, index, ..., text
    if [int(i) for i in pieces[1::2]] != list(range(len(blocks))):
        raise ValueError("the chat template did not render each prompt_embeds part exactly once, in order")
    segments = []
    for k, chunk in enumerate(pieces[0::2]):
        ids = tokenizer(chunk, add_special_tokens=False).input_ids if chunk else []
        if ids:
            segments.append(list(ids))
        if k < len(blocks):
            segments.append(blocks[k])
    if not segments:
        raise ValueError("the chat template rendered an empty prompt")
    return segments


def tensor_rows(data: Any, hidden_size: int):
    """An offline part's data as rows: a float tensor or array of shape (seq_len, hidden_size) or
    (1, seq_len, hidden_size)."""
    expected = f"expected a float tensor of shape (seq_len, {hidden_size})"
    if isinstance(data, torch.Tensor):
        floating = data.dtype.is_floating_point and data.layout == torch.strided
    elif isinstance(data, np.ndarray):
        floating = np.issubdtype(data.dtype, np.floating)
    else:
        raise ValueError(f"prompt_embeds data must be a torch.Tensor or numpy array here, got {_type_name(data)}; "
                         f"{expected}")
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if not floating or data.ndim != 2 or data.shape[1] != hidden_size or data.shape[0] == 0:
        raise ValueError(f"prompt_embeds data is {_type_name(data)} {data.dtype} of shape {tuple(data.shape)}; "
                         f"{expected}")
    return data


def chat_prompt(tokenizer, messages: Any, *, hidden_size: int, max_rows: int | None = None,
                chat_template: str | None = None, add_generation_prompt: bool = True,
                template_kwargs: dict | None = None) -> dict:
    """The engine prompt of one conversation whose embeds parts hold tensors (offline, cluster client)."""
    parsed = parse_messages(messages, lambda data: tensor_rows(data, hidden_size), max_rows=max_rows)
    return as_prompt(render_segments(tokenizer, parsed, add_generation_prompt=add_generation_prompt,
                                     chat_template=chat_template, template_kwargs=template_kwargs))


def segments_length(segments: list) -> int:
    return sum(len(s) if isinstance(s, list) else int(s.shape[0]) for s in segments)


def as_prompt(segments: list) -> dict:
    """The engine's prompt dict: plain token ids when there are no embeds rows."""
    if all(isinstance(s, list) for s in segments):
        return {"prompt_token_ids": [t for s in segments for t in s]}
    return {"prompt_segments": segments}
