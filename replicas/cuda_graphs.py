"""Decode steps as captured CUDA graphs, one per batch size of a ladder, replayed after the step's
inputs land in the static buffers the graphs read (the step-input buffer and the hidden-state input).

The input hidden states are built outside the graph (token rows looked up, supplied embeds rows
placed in), so a decode batch with prompt-embeds rows replays the same graph as one without.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from replicas.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    ladder = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({b for b in ladder if b <= max_batch} | {max_batch})


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    hidden_out: torch.Tensor  # [batch, hidden]: the graph's output buffer


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], backend, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, sizes: list[int]):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = sizes
        self.hidden_in = torch.zeros((sizes[-1], hidden_size), dtype=dtype, device=device)
        self.steps: dict[int, CapturedStep] = {}
        self.pool = None

    def size_for(self, batch: int) -> int | None:
        i = bisect.bisect_left(self.sizes, batch)
        return self.sizes[i] if i < len(self.sizes) else None

    def capture(self, batch: int, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """positions/meta: views of the step-input buffer at this batch size (padding rows write no KV)."""
        meta.backend_state["plan"] = self.backend.plan(batch, batch, 1, 1, split_batch=batch)
        x = self.hidden_in[:batch]
        self.model(x, positions, self.kv_caches, meta, self.backend)  # compile and warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(x, positions, self.kv_caches, meta, self.backend)
        if self.pool is None:
            self.pool = graph.pool()
        self.steps[batch] = CapturedStep(graph, out)

    def replay(self, batch: int) -> torch.Tensor:
        step = self.steps[batch]
        step.graph.replay()
        return step.hidden_out
