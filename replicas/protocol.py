"""The wire protocol between callers (the HTTP router, `cluster.connect()`) and replicas.

Plain dataclasses only: both sides import this module and nothing here holds a live engine object.
Output flows as deltas: the engine emits each completion's new tokens once (replicas.engine's
delta mode), the replica folds a step's (or an interval's) deltas into one GenerateChunk, and the
caller appends them; nothing is accumulated and diffed again on the way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from replicas.outputs import Logprob
from replicas.sampling_params import SamplingParams


@dataclass
class Continuation:
    """What a client already received of a completion whose replica died: the new replica resumes
    after it. `token_ids` become the tail of the prompt (embeds prompts: a segmented prompt
    [embeds, token_ids]); `text` is what was sent, so text the old replica held back (a partial
    character, a possible stop string) is sent now instead of being lost."""

    index: int  # the completion (of the original request's n) this resumes
    token_ids: list[int]
    text: str


@dataclass
class GenerateRequest:
    request_id: str
    prompt: str | list[int] | None  # None (or "") when the prompt is the embeds argument
    params: SamplingParams
    prefix_keys: list[str] = field(default_factory=list)  # read by router.routing for affinity
    echo: bool = False  # the accepted chunk then carries the prompt's text
    # A segmented prompt: token-id lists and row counts of the embeds argument (replicas.segments).
    prompt_segments: list | None = None
    continuation: Continuation | None = None  # failover: resume a completion (see Continuation)


@dataclass
class ReplicaTarget:
    """Pins a handle call to one replica: router.routing sends it there while that replica lives,
    and a replica that is not the target ignores the call (see Replica.abort, inject_fault)."""

    replica_id: str  # Serve's unique replica id, as GenerateChunk.replica_id and LoadReport.replica_id


@dataclass
class CompletionDelta:
    """The new text/tokens of one completion since its previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def extend(self, later: "CompletionDelta") -> None:
        """Append a later delta of the same completion."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.finish_reason is not None:
            self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass
class GenerateChunk:
    """One message of a request's stream: the new text/tokens of each of its n completions.

    The first chunk of every request is either `accepted` (the prompt passed validation; it
    carries the first output too, when there is one) or carries `error` (a client error: the
    request was never started). Later chunks each hold what the engine made since the previous
    one: one step, or several folded together.
    """

    request_id: str
    deltas: list[CompletionDelta] = field(default_factory=list)
    finished: bool = False
    accepted: bool = False
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None  # once, with the first output
    prompt_text: str | None = None
    prompt_tokens: list[str] | None = None  # each prompt token's text, for echo with logprobs
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once, with the first output
    replica_id: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(len(d.token_ids) for d in self.deltas)

    def extend(self, later: "GenerateChunk") -> None:
        """Fold a later chunk of the same request into this one (one message instead of two)."""
        by_index = {d.index: d for d in self.deltas}
        for d in later.deltas:
            if d.index in by_index:
                by_index[d.index].extend(d)
            else:
                copy = dataclasses.replace(d, token_ids=list(d.token_ids))
                self.deltas.append(copy)
                by_index[d.index] = copy
        self.finished = later.finished
        self.num_prompt_tokens = later.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = later.num_cached_tokens or self.num_cached_tokens
        if self.prompt_token_ids is None:
            self.prompt_token_ids = later.prompt_token_ids
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs


@dataclass
class LoadReport:
    """A replica's load: its `get_load()` answer, and (as a dict, Serve's envelope) what Serve polls
    through `record_routing_stats` for router.routing and the router's /metrics."""

    replica_id: str
    alive: bool
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_streams: int = 0  # open generate/complete calls
    num_requests: int = 0  # requests started since the replica started
    num_aborted: int = 0  # requests whose caller left before they finished
    num_steps: int = 0  # engine steps run since the replica started
    step_seconds: float = 0.0  # their wall time, summed: the engine's step as it runs while serving

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV blocks in use (cached-but-free blocks count as free)."""
        total = self.num_total_blocks
        return (total - self.num_free_blocks) / total if total else 0.0

    @property
    def num_in_flight(self) -> int:
        return self.num_running + self.num_waiting

    def to_routing_stats(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_routing_stats(cls, stats: dict | None) -> "LoadReport | None":
        """The report inside Serve's routing-stats dict; None before the first poll."""
        if not stats:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stats.items() if k in names})


@dataclass
class ModelInfo:
    name: str
    hidden_size: int
    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    replica_id: str
    node_id: str
