"""A request and its sequences (n > 1 gives several), as the scheduler and runner see them."""
from __future__ import annotations

import enum
import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from replicas.detokenizer import IncrementalDetokenizer
from replicas.outputs import DeltaCursor, Logprob
from replicas.sampling_params import SamplingParams

_seq_ids = itertools.count()

# Stands in token_ids for a sampled token still on its way back from the device.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One generated continuation. Embeds positions (`embeds_segments`, or the whole `prompt_embeds`)
    take supplied rows; the rest take `token_ids` (which hold a placeholder id at embeds positions)."""

    request_id: str
    index: int
    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    prompt_embeds: torch.Tensor | None
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    embeds_segments: list[tuple[int, torch.Tensor]] | None = None  # (first position, rows); None: prompt_embeds at 0
    max_tokens: int = 16
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained keys of full blocks, computed lazily
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # filled as prefill chunks run
    visible_text_len: int = 0  # text shown to callers; the tail that may begin a stop string waits
    eager_text: bool = True  # detokenize every step (streams, stop strings); else once at the end
    emit_text: bool = True  # False: never decoded here, the stream's consumer decodes (StreamText)
    table_row: int = -1  # the runner's device block-table row while the sequence holds blocks
    num_synced_blocks: int = 0  # leading block_table entries already written to that row
    # Per block, the rows_digest of each embeds run, computed on a digest thread (KVCacheManager).
    embeds_digests: Future | None = None
    pending_sample_index: int = -1  # row of the in-flight step's samples holding this sequence's PENDING_TOKEN
    sent: DeltaCursor = field(default_factory=DeltaCursor)  # delta mode: what earlier outputs carried
    output_offset: int = 0  # output tokens made before this sequence (a failover continuation's prompt tail)

    def __post_init__(self) -> None:
        if self.embeds_segments is None:
            self.embeds_segments = [] if self.prompt_embeds is None else [(0, self.prompt_embeds)]
        # A plain int (the runner asks every step): positions at or past it are never embeds.
        self.num_embeds = max((start + rows.shape[0] for start, rows in self.embeds_segments), default=0)

    def is_embeds_position(self, position: int) -> bool:
        return any(start <= position < start + rows.shape[0] for start, rows in self.embeds_segments)

    def embeds_spans(self, start: int, end: int):
        """(first position, rows) of the supplied embedding rows among positions [start, end)."""
        for first, rows in self.embeds_segments:
            lo, hi = max(start, first), min(end, first + rows.shape[0])
            if lo < hi:
                yield lo, rows[lo - first:hi - first]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def read_output_ids(self) -> list[int]:
        """Generated tokens the host has read back (no trailing PENDING_TOKEN)."""
        end = len(self.token_ids)
        while end > self.num_prompt_tokens and self.token_ids[end - 1] == PENDING_TOKEN:
            end -= 1
        return self.token_ids[self.num_prompt_tokens:end]

    def drop_pending(self) -> None:
        while len(self.token_ids) > self.num_prompt_tokens and self.token_ids[-1] == PENDING_TOKEN:
            self.token_ids.pop()

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def reached_max_tokens(self) -> bool:
        """Every allowed token is sampled (some may still be on the way back): nothing left to compute."""
        return self.num_output_tokens >= self.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None  # None for embeds prompts
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    final_only: bool = False  # reported once, when finished
    delta: bool = False  # each output carries only what is new since the previous one (streams)

    @property
    def reached_max_tokens(self) -> bool:
        """Every allowed token is sampled (some may still be on the way back): nothing left to compute."""
        return self.num_output_tokens >= self.max_tokens

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
