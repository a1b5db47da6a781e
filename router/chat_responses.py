"""OpenAI chat completion bodies and SSE chunks built from replica deltas.

`ChatChoice` folds a completion's deltas as `router.responses.Choice` does for completions, so the
router's shared streaming and collecting code drives both: `apply` returns the chunk's choice,
`final` the finished one, `aborted` the closing chunk of a choice its replica never finished.
"""
from __future__ import annotations

from dataclasses import dataclass

from replicas.deployment import CompletionDelta
from router.responses import CompletionHeader
from router.responses import _lp as clamp_logprob


def _token_entry(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": clamp_logprob(logprob),
            "bytes": list(text.encode("utf-8", "surrogatepass"))}


def logprobs_content(delta: CompletionDelta, top_k: int) -> list[dict]:
    """Chat's `logprobs.content`: per token its text, logprob, bytes and the top_k best."""
    out = []
    for tid, entries in zip(delta.token_ids, delta.logprobs or []):
        sampled = entries.get(tid)
        entry = _token_entry((sampled.decoded_token or "") if sampled else "", sampled.logprob if sampled else None)
        # the engine lists the k best first, then the sampled token when it is not among them
        entry["top_logprobs"] = [_token_entry(lp.decoded_token or "", lp.logprob) for lp in entries.values()][:top_k]
        out.append(entry)
    return out


@dataclass
class ChatChoice:
    index: int
    want_logprobs: bool = False
    top_logprobs: int = 0
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict] | None = None
    started: bool = False
    echo_tokens: list[str] | None = None  # set by the router for every job; chat has no echo

    def __post_init__(self) -> None:
        if self.want_logprobs:
            self.logprobs = []

    def apply(self, delta: CompletionDelta) -> dict:
        """Fold a delta in; return it as a streaming chunk's choice (the first names the role)."""
        message = {"content": delta.text}
        if not self.started:
            message = {"role": "assistant", **message}
            self.started = True
        self.text += delta.text
        self.num_tokens += len(delta.token_ids)
        piece = None
        if self.logprobs is not None:
            piece = logprobs_content(delta, self.top_logprobs)
            self.logprobs.extend(piece)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        return {"index": self.index, "delta": message,
                "logprobs": {"content": piece} if piece is not None else None,
                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}

    def aborted(self) -> dict:
        """Close a choice that ended without a finish_reason."""
        self.finish_reason = "abort"
        return {"index": self.index, "delta": {}, "logprobs": None, "finish_reason": "abort", "stop_reason": None}

    def restarted(self) -> "ChatChoice":
        return ChatChoice(index=self.index, want_logprobs=self.want_logprobs, top_logprobs=self.top_logprobs)

    def final(self) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": self.text},
                "logprobs": {"content": self.logprobs} if self.logprobs is not None else None,
                "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}


class ChatHeader(CompletionHeader):
    OBJECT = "chat.completion"
    CHUNK_OBJECT = "chat.completion.chunk"
