"""Builds one step's flattened batch (prefill chunks and decodes, token ids and embeds rows) in a
pinned host buffer and sends it to the device with one non-blocking copy.

Every input lives at a fixed offset of one persistent device buffer, so a captured CUDA graph
reads the next step's inputs from the same addresses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from replicas.attention import AttentionMetadata
from replicas.block_tables import DeviceBlockTables, TableUpdate
from replicas.scheduler import SchedulerOutput
from replicas.sequence import PENDING_TOKEN, Sequence


@dataclass
class PromptLogprobRows:
    """Rows of one sequence's prefill chunk whose logits score the next prompt token."""

    seq: Sequence
    rows: list[int]  # flat rows
    targets: list[int]  # the prompt token each row predicts


@dataclass
class StepBatch:
    num_rows: int  # query rows, padding included
    num_seqs: int  # sequences, padding included
    input_ids: torch.Tensor  # [num_rows]
    positions: torch.Tensor  # [num_rows]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [num_samples] flat rows whose logits yield each sampling sequence's token
    num_samples: int
    embeds_index: torch.Tensor | None  # [E] flat rows that take a supplied embedding
    embeds_rows: torch.Tensor | None  # [E, hidden] on the device
    prompt_logprob_rows: list[PromptLogprobRows]


@dataclass
class FilledStep:
    """How much of each host region one build filled, and the block-table updates it sent."""

    num_rows: int
    num_seqs: int
    num_samples: int
    num_embeds: int
    max_query_len: int
    max_seq_len: int
    updates: list[TableUpdate]

    def lengths(self) -> dict[str, int]:
        """The filled prefix of each region a rank needs to repeat the step (token ids excepted)."""
        return {"pos": self.num_rows, "slots": self.num_rows, "q_start": self.num_seqs + 1,
                "seq_lens": self.num_seqs, "seq_rows": self.num_seqs, "sample_rows": self.num_samples,
                "embeds_index": self.num_embeds}


class _Regions:
    """Offsets of each input inside the flat int64 buffer."""

    def __init__(self, max_rows: int, max_seqs: int, max_updates: int):
        sizes = {"ids": max_rows, "pos": max_rows, "slots": max_rows, "embeds_index": max_rows,
                 "q_start": max_seqs + 1, "seq_lens": max_seqs, "seq_rows": max_seqs, "sample_rows": max_seqs,
                 "gather_dst": max_seqs, "gather_src": max_seqs, "upd_row": max_updates, "upd_col": max_updates, "upd_val": max_updates}
        self.slices: dict[str, slice] = {}
        at = 0
        for name, size in sizes.items():
            self.slices[name] = slice(at, at + size)
            at += size
        self.total = at


class StepInputBuilder:
    def __init__(self, max_rows: int, max_seqs: int, block_size: int, tables: DeviceBlockTables,
                 device: torch.device, embeds_dtype: torch.dtype):
        self.max_rows, self.max_seqs, self.block_size = max_rows, max_seqs, block_size
        self.tables, self.device, self.embeds_dtype = tables, device, embeds_dtype
        self.max_updates = max_seqs * 2 + max_rows // block_size + 2
        self.regions = _Regions(max_rows, max_seqs, self.max_updates)
        self.cuda = device.type == "cuda"
        # Two pinned host buffers taken in turn: a step fills one while the other's copy may still wait
        # behind earlier GPU work; an event says when a buffer may be written again.
        self.hosts = [torch.zeros(self.regions.total, dtype=torch.int64, pin_memory=self.cuda)
                      for _ in range(2 if self.cuda else 1)]
        self.host_arrays = [{k: h.numpy()[s] for k, s in self.regions.slices.items()} for h in self.hosts]
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.hosts)
        self.turn = 0
        self.staging: list[torch.Tensor] | None = None  # pinned embeds rows, made on the first embeds step
        self.dev = torch.zeros(self.regions.total, dtype=torch.int64, device=device) if self.cuda else self.hosts[0]
        self.views = {k: self.dev[s] for k, s in self.regions.slices.items()}

    def _host_views(self) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        self.turn = (self.turn + 1) % len(self.hosts)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        return self.hosts[self.turn], self.host_arrays[self.turn]

    def build(self, out: SchedulerOutput, pad_to: int | None = None,
              prev_tokens: torch.Tensor | None = None) -> StepBatch:
        """pad_to: a captured decode graph's batch size; rows past the real ones write no KV.
        prev_tokens: the previous step's sampled tokens on the device; a token the host has not
        read back yet (PENDING_TOKEN) is taken from there (seq.pending_sample_index)."""
        host, h = self._host_views()
        bs = self.block_size
        updates: list[TableUpdate] = []
        embeds: list[torch.Tensor] = []
        prompt_rows: list[PromptLogprobRows] = []
        t = num_embeds = num_samples = max_q = max_len = num_gathers = 0
        for i, s in enumerate(out.scheduled):
            seq, start, n = s.seq, s.start, s.num_new_tokens
            end = start + n
            h["seq_rows"][i] = self.tables.sync(seq, updates)
            h["q_start"][i] = t
            h["seq_lens"][i] = end
            table = seq.block_table
            if n == 1:
                token = seq.token_ids[start]
                if token == PENDING_TOKEN:
                    h["gather_dst"][num_gathers] = t
                    h["gather_src"][num_gathers] = seq.pending_sample_index
                    num_gathers += 1
                    token = 0
                h["ids"][t] = token
                h["pos"][t] = start
                h["slots"][t] = table[start // bs] * bs + start % bs
            else:
                positions = np.arange(start, end)
                h["ids"][t:t + n] = seq.token_ids[start:end]
                h["pos"][t:t + n] = positions
                blocks = np.asarray(table[start // bs:(end - 1) // bs + 1], dtype=np.int64)
                h["slots"][t:t + n] = blocks[positions // bs - start // bs] * bs + positions % bs
            for first, rows in (seq.embeds_spans(start, end) if start < seq.num_embeds else ()):
                h["embeds_index"][num_embeds:num_embeds + rows.shape[0]] = np.arange(rows.shape[0]) + (t + first - start)
                num_embeds += rows.shape[0]
                embeds.append(rows)
            if seq.wants_prompt_logprobs:
                self._prompt_logprob_rows(seq, start, end, t, prompt_rows)
            t += n
            if s.samples:
                h["sample_rows"][num_samples] = t - 1
                num_samples += 1
            max_q, max_len = max(max_q, n), max(max_len, end)
        num_seqs = len(out.scheduled)
        h["q_start"][num_seqs] = t
        if pad_to is not None and pad_to > num_seqs:  # padding: one row each, no KV write, a 1-token context
            extra = pad_to - num_seqs
            h["ids"][t:t + extra] = 0
            h["pos"][t:t + extra] = 0
            h["slots"][t:t + extra] = -1
            h["seq_lens"][num_seqs:pad_to] = 1
            h["seq_rows"][num_seqs:pad_to] = 0
            h["q_start"][num_seqs + 1:pad_to + 1] = np.arange(t + 1, t + extra + 1)
            t, num_seqs = t + extra, pad_to
        num_updates = self._write_updates(h, updates)
        self.filled = FilledStep(t, num_seqs, num_samples, num_embeds, max(max_q, 1), max(max_len, 1), updates)
        return self._finish(host, self.filled, num_gathers, num_updates, prev_tokens, embeds, prompt_rows)

    def filled_regions(self) -> dict[str, np.ndarray]:
        """The host regions the last build filled (what another tensor-parallel rank needs of it)."""
        h = self.host_arrays[self.turn]
        return {name: h[name][:n] for name, n in self.filled.lengths().items()}

    def load(self, regions: dict[str, np.ndarray], step: FilledStep) -> StepBatch:
        """A step another rank built (filled_regions and its FilledStep), in this builder's buffers; the
        token ids are left for the caller to fill (tensor parallel: broadcast from rank 0)."""
        host, h = self._host_views()
        for name, values in regions.items():
            h[name][:len(values)] = values
        return self._finish(host, step, 0, self._write_updates(h, step.updates), None, [], [])

    def _finish(self, host: torch.Tensor, step: FilledStep, num_gathers: int, num_updates: int,
                prev_tokens: torch.Tensor | None, embeds: list[torch.Tensor],
                prompt_rows: list[PromptLogprobRows]) -> StepBatch:
        """Send the filled host buffer to the device and make the step's views of it."""
        if self.cuda:
            self.dev.copy_(host, non_blocking=True)
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record()
        v = self.views
        t, num_seqs, num_samples, num_embeds = step.num_rows, step.num_seqs, step.num_samples, step.num_embeds
        if num_gathers:
            dst = v["gather_dst"][:num_gathers]
            v["ids"].index_copy_(0, dst, prev_tokens.index_select(0, v["gather_src"][:num_gathers]))
        if num_updates:
            self.tables.table[v["upd_row"][:num_updates], v["upd_col"][:num_updates]] = \
                v["upd_val"][:num_updates].to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=v["slots"][:t], query_start_loc=v["q_start"][:num_seqs + 1], seq_lens=v["seq_lens"][:num_seqs],
            block_tables=self.tables.table, seq_rows=v["seq_rows"][:num_seqs], max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len, block_size=self.block_size)
        embeds_rows = self._embeds_to_device(embeds, num_embeds) if embeds else None
        return StepBatch(
            num_rows=t, num_seqs=num_seqs, input_ids=v["ids"][:t], positions=v["pos"][:t], meta=meta,
            sample_rows=v["sample_rows"][:num_samples], num_samples=num_samples,
            embeds_index=v["embeds_index"][:num_embeds] if num_embeds else None, embeds_rows=embeds_rows,
            prompt_logprob_rows=prompt_rows)

    def _embeds_to_device(self, spans: list[torch.Tensor], total: int) -> torch.Tensor:
        """The step's embeds rows on the device: gathered into a pinned staging buffer (two, taken in
        turn like the int buffers) and sent with one copy that does not wait for the GPU."""
        if not self.cuda:
            return torch.cat(spans).to(self.embeds_dtype) if len(spans) > 1 else spans[0].to(self.embeds_dtype)
        if self.staging is None:
            shape = (self.max_rows, spans[0].shape[1])
            self.staging = [torch.empty(shape, dtype=self.embeds_dtype, pin_memory=True) for _ in range(2)]
            self.staged: list[torch.cuda.Event | None] = [None, None]
        turn = self.turn % 2
        if self.staged[turn] is not None:
            self.staged[turn].synchronize()
        stage = self.staging[turn]
        at = 0
        for rows in spans:
            stage[at:at + rows.shape[0]].copy_(rows)
            at += rows.shape[0]
        out = stage[:total].to(self.device, non_blocking=True)
        self.staged[turn] = torch.cuda.Event()
        self.staged[turn].record()
        return out

    def _write_updates(self, h: dict[str, np.ndarray], updates: list[TableUpdate]) -> int:
        k = 0
        for u in updates:
            n = len(u.block_ids)
            if k + n > self.max_updates:  # a long prefix hit: write that row directly
                self.tables.table[u.row, u.first_col:u.first_col + n] = torch.tensor(u.block_ids, dtype=torch.int32)
                continue
            h["upd_row"][k:k + n] = u.row
            h["upd_col"][k:k + n] = np.arange(u.first_col, u.first_col + n)
            h["upd_val"][k:k + n] = u.block_ids
            k += n
        return k

    @staticmethod
    def _prompt_logprob_rows(seq: Sequence, start: int, end: int, base: int, out: list[PromptLogprobRows]) -> None:
        # Position p scores prompt token p + 1; skip targets an earlier run (before a preemption) scored.
        first = max(start, len(seq.prompt_logprobs) - 1)
        last = min(end, seq.num_prompt_tokens - 1)
        if first < last:
            out.append(PromptLogprobRows(seq, [base - start + p for p in range(first, last)],
                                         seq.token_ids[first + 1:last + 1]))
