"""One rank of replicas.parallel.p2p_allreduce's kernels against simulated peers, on the CPU under
Triton's interpreter (run with TRITON_INTERPRET=1; tests/test_interpreted_kernels.py does).

The interpreter runs one rank's programs one after another, so the peers are simulated: before
each call their values are placed in this rank's buffer (the half and slot they would push to)
and their flags raised with the call's count. Then the rank's kernel must sum every rank's values,
push its own into every peer's buffer (same half, its slot), raise its flag there and count the
call, over several calls (the halves alternate), for one-shot and looped grids alike.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
from triton.runtime import interpreter

from replicas.parallel import p2p_allreduce as m


def _scalar_index_for_new_numpy() -> None:
    """The interpreter turns a tensor used as a loop bound into an int with int(array); program ids
    are one-element 1-d arrays, which NumPy 2.4 refuses to convert (triton 3.5-3.9 alike). Convert
    through the array's one element instead, for the calls this harness makes."""
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, *scope):
        patch_tensor(tensor, *scope)
        tensor.__index__ = lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])

    interpreter._patch_lang_tensor = patched


class SimulatedGroup:
    """Rank `rank`'s buffers, the peers' buffers it writes into, and the kernel's pointer table."""

    def __init__(self, world: int, rank: int, max_bytes: int):
        self.world, self.rank, self.slot = world, rank, max_bytes // 4  # float32 elements per slot
        self.data = [torch.zeros(2 * world * max_bytes, dtype=torch.uint8) for _ in range(world)]
        self.signals = [torch.zeros(world * m.MAX_BLOCKS, dtype=torch.int32) for _ in range(world)]
        self.status = torch.zeros(2, dtype=torch.int32)
        self.counters = torch.zeros(m.MAX_BLOCKS, dtype=torch.int32)
        self.ptrs = torch.tensor([d.data_ptr() for d in self.data] + [s.data_ptr() for s in self.signals]
                                 + [self.status.data_ptr()], dtype=torch.int64)

    def slot_of(self, holder: int, sender: int, epoch: int, n: int) -> torch.Tensor:
        start = ((epoch % 2) * self.world + sender) * self.slot
        return self.data[holder].view(torch.float32)[start:start + n]

    def peers_arrive(self, values: list[torch.Tensor], epoch: int, programs: int) -> None:
        for p, v in enumerate(values):
            if p != self.rank:
                self.slot_of(self.rank, p, epoch, v.numel()).copy_(v.flatten())
                self.signals[self.rank][p * m.MAX_BLOCKS:p * m.MAX_BLOCKS + programs] = epoch

    def check_sent(self, mine: torch.Tensor, epoch: int, programs: int) -> None:
        for p in range(self.world):
            if p != self.rank:
                assert torch.equal(self.slot_of(p, self.rank, epoch, mine.numel()), mine.flatten()), "push"
                flags = self.signals[p][self.rank * m.MAX_BLOCKS:(self.rank + 1) * m.MAX_BLOCKS]
                assert (flags[:programs] == epoch).all(), "flags"
        assert (self.counters[:programs] == epoch).all(), "counters"
        assert self.status[1] == 0, "a wait gave up"

    def waits(self, block: int) -> dict:
        return dict(RANK=self.rank, WORLD=self.world, MAX_BLOCKS_=m.MAX_BLOCKS, BLOCK_=block,
                    WAIT_LIMIT=m.WAIT_LIMIT_NS, POLL_HOST_AFTER=m.POLL_HOST_AFTER_NS)


def check_all_reduce(world: int, rank: int, n: int, calls: int = 3) -> None:
    g = SimulatedGroup(world, rank, n * 4)
    blocks = triton.cdiv(n, m.BLOCK)
    programs = min(blocks, m.MAX_PROGRAMS)
    for epoch in range(1, calls + 1):
        values = [torch.randn(n) for _ in range(world)]
        g.peers_arrive(values, epoch, programs)
        t = values[rank].clone()
        if blocks <= m.MAX_PROGRAMS:
            m._one_shot_kernel[(blocks,)](t, t, n, g.ptrs, g.counters, g.slot, **g.waits(m.BLOCK))
        else:
            m._looped_kernel[(m.MAX_PROGRAMS,)](t, t, n, g.ptrs, g.counters, g.slot, PROGRAMS=m.MAX_PROGRAMS,
                                                **g.waits(m.BLOCK))
        want = torch.zeros(n)
        for v in values:  # rank order, as the kernel sums
            want += v
        assert torch.equal(t, want), f"sum, world {world} rank {rank} n {n}"
        g.check_sent(values[rank], epoch, programs)


def check_all_reduce_add_rmsnorm(world: int, rank: int, rows: int, hidden: int, calls: int = 3) -> None:
    g = SimulatedGroup(world, rank, rows * hidden * 4)
    programs = min(rows, m.MAX_PROGRAMS)
    weight, eps = 1 + 0.1 * torch.randn(hidden), 1e-5
    residual = torch.randn(rows, hidden)
    block = triton.next_power_of_2(hidden)
    for epoch in range(1, calls + 1):
        values = [torch.randn(rows, hidden) for _ in range(world)]
        g.peers_arrive(values, epoch, programs)
        want_residual = residual.clone()
        for v in values:
            want_residual += v
        want = want_residual * torch.rsqrt(want_residual.pow(2).mean(-1, keepdim=True) + eps) * weight
        out = torch.empty(rows, hidden)
        if rows <= m.MAX_PROGRAMS:
            m._one_shot_add_rmsnorm_kernel[(rows,)](values[rank], residual, weight, out, hidden, eps, g.ptrs,
                                                    g.counters, g.slot, **g.waits(block))
        else:
            m._looped_add_rmsnorm_kernel[(m.MAX_PROGRAMS,)](values[rank], residual, weight, out, rows, hidden, eps,
                                                            g.ptrs, g.counters, g.slot, PROGRAMS=m.MAX_PROGRAMS,
                                                            **g.waits(block))
        assert torch.allclose(residual, want_residual, atol=1e-5), "residual"
        assert torch.allclose(out, want, atol=1e-4), "norm"
        g.check_sent(values[rank], epoch, programs)


def main() -> None:
    _scalar_index_for_new_numpy()
    torch.manual_seed(0)
    for world, rank, n in [(2, 0, 3000), (2, 1, 40_000), (3, 2, 70_000), (2, 0, 32 * m.BLOCK)]:
        check_all_reduce(world, rank, n)
    for world, rank, rows, hidden in [(2, 0, 3, 300), (2, 1, 70, 300), (4, 3, 33, 200)]:
        check_all_reduce_add_rmsnorm(world, rank, rows, hidden)
    print("peer all-reduce simulation: ok")


if __name__ == "__main__":
    main()
