"""Model forward passes over the paged KV cache."""
from __future__ import annotations

import functools
import importlib


@functools.cache
def kernel_module(name: str):
    """replicas.models.<name>, one of the Triton kernel modules, or None where triton is missing
    (the model then runs torch ops)."""
    try:
        return importlib.import_module(f"replicas.models.{name}")
    except ImportError:
        return None
