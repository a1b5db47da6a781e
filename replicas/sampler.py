"""Turns the last-position logits of each sampling sequence into its next token (and logprobs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from replicas.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # of the sampled token, from the raw model distribution
    top_logprobs: list[tuple[int, float, int]] | None  # (token id, logprob, rank), best first, incl. the sampled one


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        logits = logits.float().cpu()[:, : self.vocab_size]
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            self._apply_penalties(logits[row], seq)
            self._block_early_stop(logits[row], seq)

        tokens = torch.empty(len(seqs), dtype=torch.long)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        random = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random:
            tokens[random] = self._sample(logits[random], [seqs[i] for i in random])

        results = []
        for row, seq in enumerate(seqs):
            token = int(tokens[row])
            lp = float(raw_logprobs[row, token])
            top = None
            if seq.params.logprobs is not None:
                top = self.top_logprobs(raw_logprobs[row], token, seq.params.logprobs)
            results.append(SampleResult(token, lp, top))
        return results

    @staticmethod
    def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> list[tuple[int, float, int]]:
        """The k best (token, logprob, rank) of one distribution, plus `token` when it is not among them."""
        out = []
        if k > 0:
            values, ids = logprobs.topk(k)
            out = [(int(i), float(v), rank + 1) for rank, (v, i) in enumerate(zip(values, ids))]
        if all(t != token for t, _, _ in out):
            rank = int((logprobs > logprobs[token]).sum()) + 1
            out.append((token, float(logprobs[token]), rank))
        return out

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(t for t in seq.token_ids[seq.num_embeds:] if t < row.shape[0])),
                                dtype=torch.long)
            if seen.numel():
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long)
            if out.numel():
                counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    def _block_early_stop(self, row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            stops = [t for t in stops if 0 <= t < row.shape[0]]
            if stops:
                row[stops] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs]).unsqueeze(1)
        logits = logits / temps
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([s.params.min_p for s in seqs]).unsqueeze(1)
        if bool((min_p > 0).any()):
            probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        # Exponential race (Gumbel-max equivalent): a per-sequence generator makes seeded requests
        # repeat whatever else shares the batch.
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=seq.generator or self.generator)
        return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k]).unsqueeze(1)
    ranks = torch.arange(vocab).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
