"""What rank 0 sends the other ranks each step: plain data, no live engine objects."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from replicas.block_tables import TableUpdate
from replicas.step_inputs import FilledStep, StepBatch, StepInputBuilder


@dataclass
class StepMessage:
    """One step as rank 0's input builder laid it out: the filled prefix of each host region, packed
    into one int64 array (cut apart by the counts), and the block-table updates as flat runs of
    (row, first column, count, block ids...).

    Token ids are not here (rank 0 broadcasts them from its device: some were sampled there and not
    read back yet), nor are embeds rows (they join the hidden states in the embedding's all-reduce)."""

    counts: tuple[int, int, int, int, int, int]  # FilledStep's counts, in field order
    regions: np.ndarray  # int64
    updates: np.ndarray  # int64
    graph_size: int | None  # the captured decode graph to replay; None: eager
    logit_rows: list[np.ndarray]  # each prompt-logprob sequence's rows, in the order rank 0 scores them

    @classmethod
    def of(cls, inputs: StepInputBuilder, batch: StepBatch, graph_size: int | None) -> "StepMessage":
        f = inputs.filled
        runs = []
        for u in f.updates:
            runs += [u.row, u.first_col, len(u.block_ids), *u.block_ids]
        return cls((f.num_rows, f.num_seqs, f.num_samples, f.num_embeds, f.max_query_len, f.max_seq_len),
                   np.concatenate(list(inputs.filled_regions().values())), np.asarray(runs, dtype=np.int64),
                   graph_size, [np.asarray(p.rows, dtype=np.int64) for p in batch.prompt_logprob_rows])

    def filled_step(self) -> FilledStep:
        updates, at, runs = [], 0, self.updates.tolist()
        while at < len(runs):
            row, col, n = runs[at:at + 3]
            updates.append(TableUpdate(row, col, runs[at + 3:at + 3 + n]))
            at += 3 + n
        return FilledStep(*self.counts, updates)

    def filled_regions(self, step: FilledStep) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for name, n in step.lengths().items():
            out[name] = self.regions[at:at + n]
            at += n
        return out


@dataclass
class EmbedMessage:
    """Rank 0's input_embeddings of num_ids ids: the other ranks join the embedding's collectives
    (the ids arrive in its broadcast)."""

    num_ids: int
