"""Turns the last-position logits of each sampling sequence into its next token (and logprobs),
on the logits' device. Everything the host needs comes back in one device-to-host copy."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from replicas.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # of the sampled token, from the raw model distribution
    top_logprobs: list[tuple[int, float, int]] | None  # (token id, logprob, rank), best first, incl. the sampled one


@dataclass
class SampleLaunch:
    tokens: torch.Tensor  # [S] int64 on the device: the next step's inputs can be read from here
    packed: torch.Tensor  # [S, columns] float64: token, logprob, rank, top ids, top logprobs
    k: int | None  # top logprobs packed per row


def _fused_kernel():
    if os.environ.get("RAYLM_FUSED_SAMPLING", "1") == "0":
        return None
    try:
        from replicas.sampling_kernels import fused_sample
    except ImportError:
        return None
    return fused_sample


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device: torch.device):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.fused = _fused_kernel() if device.type == "cuda" else None
        self.num_launches = 0

    def fuses(self, seqs: list[Sequence]) -> bool:
        """Plain temperature/greedy sampling without logprobs, penalties, min_tokens, top-k/p or min-p:
        one Triton pass over the model-dtype logits (launch_fused)."""
        if self.fused is None:
            return False
        for s in seqs:
            p = s.params
            if (p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                    or s.num_output_tokens < p.min_tokens
                    or (not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0))):
                return False
        return True

    def launch_fused(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleLaunch:
        """A seeded sequence draws from (its seed, its output position), so it repeats whatever shares
        the batch; the others from (the engine seed, a per-launch counter and their row)."""
        self.num_launches += 1
        seeds, offsets, temps = [], [], []
        for row, s in enumerate(seqs):
            p = s.params
            temps.append(0.0 if p.greedy else p.temperature)
            if p.seed is not None:
                seeds.append((p.seed + s.index) & 0x7FFFFFFFFFFFFFFF)
                offsets.append(s.num_output_tokens + s.output_offset)
            else:
                seeds.append(self.seed)
                offsets.append((self.num_launches << 20) + row)
        tokens, logprobs = self.fused(logits, self.vocab_size, self._to_device(temps, torch.float32),
                                      self._to_device(seeds, torch.long), self._to_device(offsets, torch.long))
        return SampleLaunch(tokens, torch.stack([tokens.double(), logprobs.double()], dim=1), None)

    def launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleLaunch:
        """Sample on the device; nothing waits for the GPU here."""
        raw = logits[:, : self.vocab_size].float()
        lse = torch.logsumexp(raw, dim=-1)
        processed = self._process(raw, seqs)
        greedy = [s.params.greedy for s in seqs]
        tokens = processed.argmax(dim=-1) if all(greedy) else self._sample(processed, seqs, greedy)
        token_logprob = raw.gather(1, tokens[:, None]).squeeze(1) - lse
        columns = [tokens.double()[:, None], token_logprob.double()[:, None]]
        k = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=None)
        if k is not None:
            logprobs = raw - lse[:, None]
            columns.append(((logprobs > token_logprob[:, None]).sum(dim=-1) + 1).double()[:, None])
            if k > 0:
                values, ids = logprobs.topk(k, dim=-1)
                columns += [ids.double(), values.double()]
        return SampleLaunch(tokens, torch.cat(columns, dim=1), k)

    def results(self, rows: list[list[float]], seqs: list[Sequence], k: int | None) -> list[SampleResult]:
        """rows: the launch's packed columns, on the host."""
        return [self._result(row, seq, k) for row, seq in zip(rows, seqs)]

    @staticmethod
    def _result(row: list[float], seq: Sequence, k: int | None) -> SampleResult:
        token, logprob = int(row[0]), row[1]
        want = seq.params.logprobs
        if want is None:
            return SampleResult(token, logprob, None)
        top = [(int(row[3 + j]), row[3 + k + j], j + 1) for j in range(want)]
        if all(t != token for t, _, _ in top):
            top.append((token, logprob, int(row[2])))
        return SampleResult(token, logprob, top)

    @staticmethod
    def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> list[tuple[int, float, int]]:
        """The k best (token, logprob, rank) of one host distribution, plus `token` when it is not among them."""
        out = []
        if k > 0:
            values, ids = logprobs.topk(k)
            out = [(int(i), float(v), rank + 1) for rank, (v, i) in enumerate(zip(values, ids))]
        if all(t != token for t, _, _ in out):
            rank = int((logprobs > logprobs[token]).sum()) + 1
            out.append((token, float(logprobs[token]), rank))
        return out

    # ---- logits processing: penalties, then min_tokens --------------------------------------

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        repetition = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        additive = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
        blocked = [(i, t) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                   for t in self._stop_ids(s, logits.shape[1])]
        if not (repetition or additive or blocked):
            return logits
        logits = logits.clone()
        if repetition:
            seen = self._counts(logits.shape[1], [self._penalised_ids(seqs[i]) for i in repetition]) > 0
            rows = logits[repetition]
            penalty = self._column([seqs[i].params.repetition_penalty for i in repetition])
            penalized = torch.where(rows > 0, rows / penalty, rows * penalty)
            logits[repetition] = torch.where(seen, penalized, rows)
        if additive:
            counts = self._counts(logits.shape[1], [seqs[i].output_token_ids for i in additive])
            frequency = self._column([seqs[i].params.frequency_penalty for i in additive])
            presence = self._column([seqs[i].params.presence_penalty for i in additive])
            logits[additive] -= frequency * counts + presence * (counts > 0).float()
        if blocked:
            rows, ids = zip(*blocked)
            logits[self._to_device(rows, torch.long), self._to_device(ids, torch.long)] = float("-inf")
        return logits

    @staticmethod
    def _penalised_ids(seq: Sequence) -> list[int]:
        """Every token id of the sequence but the placeholders at embeds positions."""
        if not seq.embeds_segments:
            return seq.token_ids
        return [t for i, t in enumerate(seq.token_ids) if i >= seq.num_embeds or not seq.is_embeds_position(i)]

    def _stop_ids(self, seq: Sequence, vocab: int) -> list[int]:
        stops = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos_token_ids)
        return [t for t in stops if 0 <= t < vocab]

    def _to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without waiting for the GPU (pinned, non-blocking copy)."""
        host = torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    def _column(self, values: list[float]) -> torch.Tensor:
        return self._to_device(values, torch.float32)[:, None]

    def _counts(self, vocab: int, token_lists: list[list[int]]) -> torch.Tensor:
        """[rows, vocab] occurrence counts of each row's tokens (ids outside the vocab ignored)."""
        width = max(1, max(len(t) for t in token_lists))
        padded = torch.full((len(token_lists), width), vocab, dtype=torch.long)
        for i, ids in enumerate(token_lists):
            if ids:
                padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.long).clamp(0, vocab)
        padded = padded.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
            else padded
        counts = torch.zeros((len(token_lists), vocab + 1), dtype=torch.float32, device=self.device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
        return counts[:, :vocab]

    # ---- random sampling ----------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        params = [s.params for s in seqs]
        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        scaled = logits / (temps[0] if len(set(temps)) == 1 else self._column(temps))
        top_k = [0 if g else p.top_k for g, p in zip(greedy, params)]
        top_p = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = self._top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params)]
        if any(m > 0 for m in min_p):
            floor = self._column(min_p) * probs.max(dim=-1, keepdim=True).values
            probs = torch.where(probs < floor, 0.0, probs)
        # Exponential race (Gumbel-max equivalent, no torch.multinomial sync); a seeded sequence
        # draws from its own generator, so it repeats whatever else shares the batch.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None and not greedy[i]:
                noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            mask = self._to_device(greedy, torch.bool)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled

    def _top_k_top_p(self, logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = self._to_device([kk if kk > 0 else vocab for kk in top_k], torch.long)[:, None]
        ranks = torch.arange(vocab, device=self.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= self._column(top_p), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
