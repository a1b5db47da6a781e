"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput / Logprob.

A request added in delta mode (streams) gets RequestOutputs that carry only what is new since the
previous one (`delta_output`); otherwise each output is the cumulative state."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the top-k and the sampled token).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Cumulative state of one request. `prompt_token_ids` is None for an embeds prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_prompt_tokens: int = 0  # embeds rows count as prompt tokens
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # one per prompt token; the first is None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class DeltaCursor:
    """How much of a sequence earlier delta outputs carried (replicas.engine's delta mode)."""

    tokens: int = 0  # output token ids (and logprobs entries)
    chars: int = 0  # characters of text
    finished: bool = False  # its finish_reason was reported
    prompt: bool = False  # the request's prompt fields were reported (first sequence only)


def delta_output(request) -> RequestOutput:
    """The new part of a request since its previous delta output: per sequence the token ids read
    back since, the text released since (a tail that may start a stop string waits), their
    logprobs, and its finish_reason once. Prompt fields come with the first output only. Nothing
    is copied but the new slices. `request`: a replicas.sequence.Request (engine thread only)."""
    outputs = []
    for s in request.seqs:
        cur = s.sent
        if cur.finished:
            continue
        end = len(s.token_ids)
        while end > s.num_prompt_tokens and s.token_ids[end - 1] < 0:  # PENDING_TOKEN: not read back
            end -= 1
        start = s.num_prompt_tokens + cur.tokens
        ids = s.token_ids[start:end]
        text = s.detokenizer.text
        visible = len(text) if s.finished else min(s.visible_text_len, len(text))
        new_text = text[cur.chars:visible] if visible > cur.chars else ""
        if not ids and not new_text and not s.finished:
            continue
        logprobs = s.logprobs[cur.tokens:cur.tokens + len(ids)] if s.params.logprobs is not None else None
        cur.tokens += len(ids)
        cur.chars = max(cur.chars, visible)
        cur.finished = s.finished
        outputs.append(CompletionOutput(s.index, new_text, ids, s.cumulative_logprob, logprobs,
                                        s.finish_reason, s.stop_reason))
    first = request.seqs[0]
    head = not first.sent.prompt
    first.sent.prompt = True
    return RequestOutput(
        request_id=request.request_id, prompt=request.prompt if head else None,
        prompt_token_ids=request.prompt_token_ids if head else None, outputs=outputs,
        finished=request.finished, num_prompt_tokens=first.num_prompt_tokens,
        prompt_logprobs=list(first.prompt_logprobs) if head and first.prompt_logprobs is not None else None,
        num_cached_tokens=first.num_cached_tokens)
