"""Pin an engine's process to chosen CPU cores (vLLM's VLLM_CPU_OMP_THREADS_BIND, as an engine option).

What it is for: several CPU engines on one machine, each on cores of its own, instead of every
engine's OpenMP threads competing for all of them. Every thread of the process is pinned, the
OpenMP pool included, whenever it was started. On one engine alone it is not a speed-up to count
on: on a 16-core Xeon VM (qwen2.5-0.5b, 8 threads, one stream) the offline step was 76.4 ms
unpinned and 65.6, 68.8 and 75.4 ms on 8 cores in three runs, and served steps moved as much
between runs (bench/results/serve-intel-xeon-16cores-8threads*.json).
"""
from __future__ import annotations

import os


def parse_cpu_list(spec: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """'0-7,12' (Linux's cpu-list syntax), one core id or a list of them -> sorted distinct core ids,
    each one this process may run on. Raises ValueError otherwise."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        cores: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            try:
                first, last = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ValueError(f"cpu_affinity {spec!r}: not a core list like '0-7,12'") from None
            if first < 0 or last < first:
                raise ValueError(f"cpu_affinity {spec!r}: {part!r} is not a core or an ascending range")
            cores.update(range(first, last + 1))
    else:
        ids = spec if isinstance(spec, (list, tuple)) else [None]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in ids):
            raise ValueError(f"cpu_affinity {spec!r}: core ids must be non-negative ints")
        cores = set(spec)
    if not cores:
        raise ValueError("cpu_affinity names no core")
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    outside = sorted(cores - allowed)
    if outside:
        raise ValueError(f"cpu_affinity names cores {outside} this process may not run on "
                         f"(it may use {sorted(allowed)})")
    return sorted(cores)


def pin_process(cores: list[int]) -> None:
    """Hold every thread of this process, and the threads they start later, to `cores` (Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cpu_affinity needs Linux (os.sched_setaffinity)")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass

