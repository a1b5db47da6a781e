"""Programmatic dependent launch (PDL) for the Triton kernels of a one-row forward pass (Hopper
and newer).

A decode step of one sequence is ~300 short kernels in a row (Llama-3.1-8B), every weight
multiply our GEMV kernel. Launched with PDL, a kernel's blocks may start while the kernel before it is finishing;
each then waits (`griddepcontrol.wait`) until that kernel has completed and its writes are visible
before it reads or writes anything, except the GEMV's first weight tile, which no kernel writes.
What overlaps is launch, block scheduling and that first load with the previous kernel's tail.
Llama-3.1-8B's one-row decode step on an H200: 4.25 -> 3.98 ms, one TP=2 rank's shapes 2.57 ->
2.34 ms. At 8 rows, where cuBLAS's GEMMs sat between our kernels, the same launches made steps
2-3% slower (at 64 rows they gained nothing). With the skinny GEMM (replicas.models.skinny_gemm)
every kernel of a 2-32 row step is ours, and PDL there still gained nothing (8B, H200, 2-32 rows:
within 2% either way, `RAYLM_PDL_MAX_ROWS=32 python bench/decode_timeline.py`), so by default only
one-row launches take it; RAYLM_PDL_MAX_ROWS=N extends it to N rows.

Every kernel launched with `launch()`'s arguments must call `wait_for_previous(PDL)` (or wait
itself) before it touches anything an earlier kernel may write. Kernels launched without them
(torch's, cuBLAS's, the peer all-reduce) keep the stream's plain ordering. `RAYLM_PDL=0`
launches everything plainly.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _supported(device_index: int) -> bool:
    if os.environ.get("RAYLM_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    if not hasattr(cuda, "gdc_wait"):
        return False  # a Triton older than PDL support
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def max_rows() -> int:
    """The most rows (tokens) a forward pass may have for its kernels to launch with PDL (1, or
    RAYLM_PDL_MAX_ROWS)."""
    return int(os.environ.get("RAYLM_PDL_MAX_ROWS", "1"))


def launch(tensor: torch.Tensor) -> dict:
    """Keyword arguments for a launch of a PDL-aware kernel over tensor, its input, whose first
    dimension is the rows (tokens): its PDL constexpr, and Triton's launch_pdl for up to
    max_rows() rows on a device that supports it."""
    if tensor.is_cuda and 1 <= tensor.shape[0] <= max_rows():
        index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        if _supported(index):
            return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Let the next kernel's blocks start scheduling, then wait for the previous kernel's writes."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
