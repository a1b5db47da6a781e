"""Continuous batching: each step fills a token budget with running sequences (decodes and
prefill chunks) first, then admits waiting ones first-come-first-served; preempts by recompute
when KV blocks run out."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from replicas.kv_cache_manager import KVCacheManager
from replicas.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int = field(init=False)  # first position computed this step
    samples: bool = field(init=False)  # the chunk reaches the sequence's end: its last row yields a token

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.kv.start_digests(seq)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        still_running: list[Sequence] = []
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.reached_max_tokens:  # finishes when its last token is read back
                still_running.append(seq)
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, n):
                victim = queue.pop() if queue else seq  # the newest running sequence gives way
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                still_running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        still_running.extend(queue)  # out of budget this step; they keep their blocks
        self.running = still_running

        if out.preempted:
            return out  # don't admit new work while the pool is short
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Prompt logprobs need every prompt position computed, so such requests skip cache hits.
            hit = self.kv.find_prefix(seq) if seq.num_computed_tokens == 0 and not seq.wants_prompt_logprobs else None
            cached = hit.num_tokens if hit else 0
            n = min(seq.num_tokens - seq.num_computed_tokens - cached, budget)
            if not self.kv.allocate(seq, n, hit):
                break
            self.waiting.popleft()
            seq.num_computed_tokens += cached
            seq.num_cached_tokens = max(seq.num_cached_tokens, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop the KV blocks and requeue at the front."""
        self.num_preemptions += 1
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance computed counts; newly full blocks join the prefix cache."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv.free(seq)
