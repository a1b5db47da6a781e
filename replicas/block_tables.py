"""Block tables kept on the device: one persistent row per sequence that holds KV blocks, written
incrementally (only the blocks a sequence gained since the last step cross to the device)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from replicas.sequence import Sequence


@dataclass
class TableUpdate:
    row: int
    first_col: int
    block_ids: list[int]


class DeviceBlockTables:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, device: torch.device):
        self.table = torch.zeros((max_rows, max_blocks_per_seq), dtype=torch.int32, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def sync(self, seq: Sequence, updates: list[TableUpdate]) -> int:
        """The sequence's row, assigning one on first use; appends the blocks the device lacks."""
        if seq.table_row < 0:
            if not self._free_rows:
                raise RuntimeError("more sequences hold KV blocks than the runner has block-table rows")
            seq.table_row = self._free_rows.pop()
            seq.num_synced_blocks = 0
        have, n = seq.num_synced_blocks, len(seq.block_table)
        if n > have:
            updates.append(TableUpdate(seq.table_row, have, seq.block_table[have:n]))
            seq.num_synced_blocks = n
        return seq.table_row

    def release(self, seq: Sequence) -> None:
        """The sequence gave its blocks back (finished, aborted or preempted)."""
        if seq.table_row >= 0:
            self._free_rows.append(seq.table_row)
            seq.table_row = -1
            seq.num_synced_blocks = 0
