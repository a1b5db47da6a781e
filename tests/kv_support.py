"""Model-free pieces for block-pool, KV-manager and scheduler tests: sequences without a model."""
from __future__ import annotations

import itertools

import torch

from replicas.inputs import PLACEHOLDER_TOKEN_ID
from replicas.kv_cache_manager import KVCacheManager
from replicas.sampling_params import SamplingParams
from replicas.scheduler import Scheduler
from replicas.sequence import Sequence

BLOCK = 16
_ids = itertools.count()


def manager(num_blocks: int, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK, caching)


def scheduler(num_blocks: int, budget: int = 64, max_seqs: int = 8, caching: bool = True) -> Scheduler:
    return Scheduler(manager(num_blocks, caching), budget, max_seqs)


def make_seq(token_ids: list[int] | None = None, embeds: torch.Tensor | None = None,
             max_tokens: int = 16) -> Sequence:
    """A prompt of token ids or of embeds rows; the scheduler and KV manager never detokenize."""
    prompt = list(token_ids) if embeds is None else [PLACEHOLDER_TOKEN_ID] * embeds.shape[0]
    return Sequence(request_id=f"r{next(_ids)}", index=0, params=SamplingParams(max_tokens=max_tokens),
                    token_ids=prompt, num_prompt_tokens=len(prompt), prompt_embeds=embeds,
                    detokenizer=None, max_tokens=max_tokens)


def live(sched: Scheduler) -> list[Sequence]:
    return [*sched.running, *sched.waiting]


def run_step(sched: Scheduler, new_token: int = 7):
    """One engine step without a model: schedule, mark computed, give each sampling sequence a token."""
    out = sched.schedule()
    sched.after_step(out)
    for s in out.scheduled:
        if s.samples:
            s.seq.token_ids.append(new_token)
    sched.kv.check_integrity(live(sched))
    return out
