"""Segmented prompts on the way to a replica: token-id lists, and row counts of one embeds array.

A segmented prompt is a list of token-id lists and embeds row blocks (`[ids, rows, ids, ...]`, what
`LLM.generate({"prompt_segments": ...})` takes). Over a Serve handle its embeds blocks travel
stacked as ONE array, the call's top-level embeds argument (resolved zero-copy from the object
store), and the request keeps only each block's row count in its place: `[ids, 7, ids, 3]`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

WireSegments = list  # list[list[int] | int]: token ids, or how many of the embeds argument's rows come next


def pack_segments(segments: list) -> tuple[WireSegments, np.ndarray | None]:
    """(wire segments, the embeds blocks stacked) of `[ids, rows, ids, ...]` (rows: numpy arrays)."""
    wire, blocks = [], []
    for segment in segments:
        if isinstance(segment, np.ndarray):
            wire.append(int(segment.shape[0]))
            blocks.append(segment)
        elif isinstance(segment, (list, tuple)):
            wire.append([int(t) for t in segment])
        else:
            raise ValueError(f"a prompt segment must be a token-id list or an embeds array, got {type(segment).__name__}")
    if not blocks:
        return wire, None
    return wire, (blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0))


def unpack_segments(wire: WireSegments, embeds: Any) -> list:
    """`[ids, rows, ids, ...]` for the engine: each row count replaced by its slice of `embeds`
    (a view: the engine copies the rows once into its own tensor)."""
    if not isinstance(wire, (list, tuple)):
        raise ValueError(f"prompt_segments must be a list, got {type(wire).__name__}")
    if embeds is not None and getattr(embeds, "ndim", 0) == 3 and embeds.shape[0] == 1:
        embeds = embeds[0]
    if embeds is not None and getattr(embeds, "ndim", 0) != 2:
        raise ValueError(f"the embeds array of prompt_segments must be 2-D, got {type(embeds).__name__} "
                         f"of shape {tuple(getattr(embeds, 'shape', ()))}")
    counts = [s for s in wire if isinstance(s, int) and not isinstance(s, bool)]
    rows = 0 if embeds is None else embeds.shape[0]
    if any(c < 1 for c in counts) or sum(counts) != rows:
        raise ValueError(f"prompt_segments name {sum(counts)} embeds rows; the embeds array has {rows}")
    out, start = [], 0
    for s in wire:
        if isinstance(s, int) and not isinstance(s, bool):
            out.append(embeds[start:start + s])
            start += s
        else:
            out.append(s)
    return out
