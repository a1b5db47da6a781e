"""OpenAI completions response bodies built from replica GenerateChunks.

A choice's global index is `prompt_index * n + completion_index`, prompts ordered embeds first,
then text prompts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

from replicas.protocol import CompletionDelta

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


def _lp(x: float | None) -> float | None:
    if x is None:
        return None
    return _MIN_LOGPROB if (math.isinf(x) or math.isnan(x)) else max(float(x), _MIN_LOGPROB)


@dataclass
class LogprobsBlock:
    """OpenAI completions `logprobs`: parallel lists, one entry per generated token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def extend(self, delta: CompletionDelta, offset: int) -> int:
        """Append the delta's tokens, their text starting at `offset`; return the next offset."""
        for tid, top in zip(delta.token_ids, delta.logprobs or []):
            sampled = top.get(tid)
            tok = sampled.decoded_token if sampled is not None and sampled.decoded_token is not None else ""
            self.tokens.append(tok)
            self.token_logprobs.append(_lp(sampled.logprob) if sampled is not None else None)
            self.top_logprobs.append({(lp.decoded_token or ""): _lp(lp.logprob) for lp in top.values()})
            self.text_offset.append(offset)
            offset += len(tok)
        return offset

    def extend_prompt(self, token_ids: list[int], texts: list[str], entries: list) -> None:
        """Echo: the prompt's tokens first (the first has no logprob), text offsets from 0."""
        offset = 0
        for tid, tok, entry in zip(token_ids, texts, entries):
            self.tokens.append(tok)
            actual = entry.get(tid) if entry else None
            self.token_logprobs.append(_lp(actual.logprob) if actual is not None else None)
            self.top_logprobs.append({(lp.decoded_token or ""): _lp(lp.logprob) for lp in entry.values()}
                                     if entry else None)
            self.text_offset.append(offset)
            offset += len(tok)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


@dataclass
class Choice:
    index: int
    echo_prefix: str = ""
    want_logprobs: bool = False
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: LogprobsBlock | None = None
    offset: int = 0
    started: bool = False
    show_prompt_logprobs: bool = False  # the request asked for vLLM's prompt_logprobs field
    prompt_logprobs: list | None = None  # that field, JSON-ready
    echo_tokens: list[str] | None = None  # echo with logprobs: each prompt token's text
    echo_block: LogprobsBlock | None = None  # echo with logprobs: the prompt's entries, sent first

    def __post_init__(self) -> None:
        self.offset = len(self.echo_prefix)
        if self.want_logprobs:
            self.logprobs = LogprobsBlock()

    def set_prompt_logprobs(self, token_ids: list[int] | None, entries: list, formatted: list) -> None:
        if self.show_prompt_logprobs:
            self.prompt_logprobs = formatted
        if self.logprobs is not None and self.echo_tokens is not None and token_ids:
            self.echo_block = LogprobsBlock()
            self.echo_block.extend_prompt(token_ids, self.echo_tokens, entries)

    def apply(self, delta: CompletionDelta) -> dict:
        """Fold a delta in; return this delta as a streaming choice dict."""
        text = delta.text
        first = not self.started
        if first:
            text = self.echo_prefix + text
            self.started = True
        self.text += text
        self.num_tokens += len(delta.token_ids)
        piece = None
        if self.logprobs is not None:
            piece = LogprobsBlock()
            if first and self.echo_block is not None:
                for block in (piece, self.logprobs):
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        getattr(block, name).extend(getattr(self.echo_block, name))
            piece_offset = self.offset
            self.offset = piece.extend(delta, piece_offset)
            self.logprobs.extend(delta, piece_offset)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        out = {"index": self.index, "text": text, "logprobs": piece.to_dict() if piece else None,
               "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
        if first and self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        return out

    def aborted(self) -> dict:
        """Close a choice that ended without a finish_reason (its stream ended early)."""
        self.finish_reason = "abort"
        return {"index": self.index, "text": "", "logprobs": None, "finish_reason": "abort", "stop_reason": None}

    def restarted(self) -> "Choice":
        """A fresh choice with the same index and echo (its request is being sent again)."""
        return Choice(index=self.index, echo_prefix=self.echo_prefix, want_logprobs=self.want_logprobs,
                      show_prompt_logprobs=self.show_prompt_logprobs, echo_tokens=self.echo_tokens)

    def final(self) -> dict:
        out = {"index": self.index, "text": self.text,
               "logprobs": self.logprobs.to_dict() if self.logprobs else None,
               "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
        out["prompt_logprobs"] = self.prompt_logprobs  # always there, null when not asked (as vLLM)
        return out


def prompt_logprobs_json(entries: list) -> list:
    """vLLM's prompt_logprobs: None for the first prompt token, then {token id: logprob entry}."""
    return [None if e is None else
            {str(t): {"logprob": _lp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in e.items()} for e in entries]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


@dataclass
class CompletionHeader:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    OBJECT: ClassVar[str] = "text_completion"  # the body's "object"
    CHUNK_OBJECT: ClassVar[str] = "text_completion"  # a streamed chunk's "object"

    def completion(self, choices: list[dict], usage_: dict) -> dict:
        return {"id": self.id, "object": self.OBJECT, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_}

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        return {"id": self.id, "object": self.CHUNK_OBJECT, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_}
