"""Sparse prompt embeds (COO, CSR, CSC, as torch.save writes them), checked, then densified.

Nothing here goes through torch.load or torch's sparse constructors (an unchecked sparse tensor
densified by torch is how CVE-2025-62164 wrote out of bounds). Each part, indices or values, is
read from its already-checked storage record as a plain tensor; the layout's invariants are
checked on those parts; the dense size is checked against the cap; only then is the dense tensor
allocated and filled by index (``index_put_``, which checks its indices again).

Duplicates: COO entries at one position are summed, as torch's ``to_dense()`` sums an uncoalesced
tensor (vLLM loads COO that way). CSR and CSC plain indices must be strictly increasing within
each compressed row or column, as torch's invariant check (under which vLLM loads) requires, so
they hold no duplicates. A COO tensor may not declare more entries than its shape has positions.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from router.errors import EmbedsError, embeds_too_large, quote
from router.torch_pickle import SparsePlan, TensorPlan


def densify(plan: SparsePlan, records: dict[str, bytes], *, max_bytes: int,
            big_endian: bool = False) -> torch.Tensor:
    """The dense tensor of ``plan`` (in its values' dtype). Each part's record must already
    agree with its plan (storage size, view within the storage)."""
    values_plan = plan.parts[-1]
    if min(plan.size, default=0) < 0:
        raise _invalid(f"its shape {quote(plan.size)} has a negative dimension")
    dense_bytes = math.prod(plan.size) * values_plan.itemsize
    if dense_bytes > max_bytes:
        raise embeds_too_large(f"the sparse tensor's dense form {quote(plan.size)}", dense_bytes,
                               max_bytes)
    parts = [_read_part(p, records[f"data/{p.key}"], big_endian) for p in plan.parts]
    if plan.layout == "coo":
        coords, values = _coo_entries(plan.size, *parts, coalesced=plan.coalesced)
    else:
        coords, values = _compressed_entries(plan.layout, plan.size, *parts)
    dense = torch.zeros(plan.size, dtype=values.dtype)
    if values.numel():
        dense.index_put_(coords, values, accumulate=True)
    return dense


def _invalid(detail: str) -> EmbedsError:
    return EmbedsError(f"prompt_embeds sparse tensor is invalid: {detail}")


def _read_part(plan: TensorPlan, data: bytes, big_endian: bool) -> torch.Tensor:
    """One part as the pickle declares it: a view of its record, byte order resolved."""
    code = f"i{plan.itemsize}"
    wire = np.frombuffer(data, dtype=(">" if big_endian else "<") + code)
    flat = torch.from_numpy(wire.astype("=" + code)).view(plan.dtype)
    part = flat.as_strided(plan.size, plan.stride, plan.offset)
    return -part if plan.neg else part  # the neg bit: only values may carry it (torch_pickle)


def _check_index_range(name: str, index: torch.Tensor, bound: int) -> None:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise _invalid(f"{name} must lie in [0, {bound}); they span "
                       f"[{int(index.min())}, {int(index.max())}]")


def _coo_entries(size: tuple[int, ...], indices: torch.Tensor, values: torch.Tensor, *,
                 coalesced: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """indices (sparse_dim, nnz), values (nnz, *dense dims): size = sparse dims + dense dims.
    A tensor flagged coalesced must have sorted, distinct indices (torch checks the same)."""
    if indices.dim() != 2 or not 1 <= indices.shape[0] <= len(size):
        raise _invalid(f"COO indices must have shape (sparse_dim, nnz) with sparse_dim in "
                       f"[1, {len(size)}]; got {tuple(indices.shape)}")
    indices = indices.to(torch.int64)  # torch takes int32 COO indices too, as int64
    sparse_dim, nnz = indices.shape
    if tuple(values.shape) != (nnz, *size[sparse_dim:]):
        raise _invalid(f"COO values must have shape {(nnz, *size[sparse_dim:])} for {nnz} "
                       f"indices and shape {size}; got {tuple(values.shape)}")
    positions = math.prod(size[:sparse_dim])
    if nnz > positions:
        raise _invalid(f"it declares {nnz} entries, more than the {positions} positions of its "
                       "shape")
    for d in range(sparse_dim):
        _check_index_range(f"COO indices of dimension {d}", indices[d], size[d])
    if coalesced and nnz > 1:
        # Row-major positions; in range, so below prod(size), which the cap keeps small.
        position = indices[0]
        for d in range(1, sparse_dim):
            position = position * size[d] + indices[d]
        if (position[1:] <= position[:-1]).any():
            raise _invalid("it is flagged coalesced but its indices are not sorted and distinct")
    return tuple(indices), values


def _compressed_entries(layout: str, size: tuple[int, ...], compressed: torch.Tensor,
                        plain: torch.Tensor,
                        values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """CSR: compressed = crow_indices (*batch, rows + 1), plain = col_indices (*batch, nnz);
    CSC the same with rows and columns swapped; values (*batch, nnz, *dense dims)."""
    names = ("crow_indices", "col_indices") if layout == "csr" else ("ccol_indices", "row_indices")
    n_batch = compressed.dim() - 1
    if n_batch < 0 or plain.dim() != compressed.dim() or len(size) < n_batch + 2:
        raise _invalid(f"{layout.upper()} {names[0]} and {names[1]} must have the same rank, at "
                       f"most {len(size) - 1}; got {tuple(compressed.shape)} and "
                       f"{tuple(plain.shape)}")
    if compressed.dtype != plain.dtype:
        raise _invalid(f"{names[0]} and {names[1]} must have one dtype")
    batch, (rows, cols), dense_dims = size[:n_batch], size[n_batch:n_batch + 2], size[n_batch + 2:]
    n_compressed, n_plain = (rows, cols) if layout == "csr" else (cols, rows)
    nnz = plain.shape[-1]
    expected = {names[0]: (*batch, n_compressed + 1), names[1]: (*batch, nnz),
                "values": (*batch, nnz, *dense_dims)}
    for name, part in zip(expected, (compressed, plain, values)):
        if tuple(part.shape) != expected[name]:
            raise _invalid(f"{layout.upper()} {name} must have shape {expected[name]} for shape "
                           f"{size}; got {tuple(part.shape)}")
    if nnz > rows * cols:
        raise _invalid(f"it declares {nnz} entries per batch, more than the {rows * cols} "
                       "positions of a matrix")
    b = math.prod(batch)
    compressed = compressed.reshape(b, n_compressed + 1).to(torch.int64)
    plain = plain.reshape(b, nnz).to(torch.int64)
    counts = compressed.diff(dim=1)
    if (compressed[:, 0] != 0).any() or (compressed[:, -1] != nnz).any() or (counts < 0).any():
        raise _invalid(f"{names[0]} must start at 0, never decrease and end at nnz ({nnz})")
    _check_index_range(names[1], plain, n_plain)
    # Which compressed row (CSR) or column (CSC) each entry belongs to; counts sum to nnz per batch.
    segment = torch.repeat_interleave(torch.arange(n_compressed).repeat(b), counts.reshape(-1))
    segment = segment.reshape(b, nnz)
    same_segment = segment[:, 1:] == segment[:, :-1]
    if (same_segment & (plain[:, 1:] <= plain[:, :-1])).any():
        raise _invalid(f"{names[1]} must be strictly increasing within each "
                       f"{'row' if layout == 'csr' else 'column'} (sorted, no duplicates)")
    batch_index = torch.arange(b).repeat_interleave(nnz)
    row, col = (segment, plain) if layout == "csr" else (plain, segment)
    coords = _batch_coords(batch, batch_index) + (row.reshape(-1), col.reshape(-1))
    return coords, values.reshape(b * nnz, *dense_dims)


def _batch_coords(batch: tuple[int, ...], flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-dimension indices of flat positions in the batch dims (row-major)."""
    coords = []
    for extent in reversed(batch):
        coords.append(flat % extent)
        flat = flat // extent
    return tuple(reversed(coords))
