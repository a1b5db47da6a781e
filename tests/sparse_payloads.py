"""Sparse torch.save payloads for the decoder tests, valid and hostile.

``forged_sparse`` pickles through torch.save exactly as a sparse tensor pickles itself
(``_rebuild_sparse_tensor(layout, (parts..., torch.Size(size)[, is_coalesced]))``), but with any
parts and size: index and value tensors of mismatched lengths, out-of-range or unsorted indices,
sizes that disagree with the parts. torch's own constructors refuse some of these, and torch.save
never looks.
"""
from __future__ import annotations

import torch
import torch._utils

from torch_save_layout import saved

LAYOUTS = {"coo": torch.sparse_coo, "csr": torch.sparse_csr, "csc": torch.sparse_csc,
           "bsr": torch.sparse_bsr, "bsc": torch.sparse_bsc}


class _Forged:
    def __init__(self, layout: str, parts: tuple, size: tuple, coalesced: bool | None):
        self.layout, self.parts, self.size, self.coalesced = LAYOUTS[layout], parts, size, coalesced

    def __reduce_ex__(self, protocol):
        extra = () if self.coalesced is None else (self.coalesced,)
        return torch._utils._rebuild_sparse_tensor, (self.layout,
                                                     (*self.parts, torch.Size(self.size), *extra))


def forged_sparse(layout: str, parts: tuple, size: tuple, coalesced: bool | None = None) -> bytes:
    """torch.save bytes of a sparse tensor of ``layout`` made of ``parts`` (COO: indices, values;
    CSR: crow_indices, col_indices, values; CSC: ccol_indices, row_indices, values)."""
    if coalesced is None and layout == "coo":
        coalesced = False
    return saved(_Forged(layout, tuple(parts), tuple(size), coalesced))


def coo(indices, values, size, coalesced: bool = False) -> bytes:
    return forged_sparse("coo", (torch.as_tensor(indices), torch.as_tensor(values)), size,
                         coalesced)


def csr(crow, col, values, size) -> bytes:
    return forged_sparse("csr", (torch.as_tensor(crow), torch.as_tensor(col),
                                 torch.as_tensor(values)), size)


def csc(ccol, row, values, size) -> bytes:
    return forged_sparse("csc", (torch.as_tensor(ccol), torch.as_tensor(row),
                                 torch.as_tensor(values)), size)


def torch_dense(raw: bytes) -> torch.Tensor:
    """What torch makes of the bytes when it checks sparse invariants (as vLLM loads them)."""
    import io

    with torch.sparse.check_sparse_tensor_invariants():
        t = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        return t.to_dense() if t.layout != torch.strided else t
