"""A one-shot all-reduce over peer GPU memory (NVLink) for the small tensors of decode steps.

NCCL's all-reduce of a decode step's few rows costs ~10-20 us of latency, paid twice per layer:
for an 8B model at TP=2 that is as long as reading the weights. Here each rank maps every peer's
buffer (CUDA IPC, once at start-up) and one Triton kernel per call
  1. stores the rank's input into its slot of every rank's buffer (posted NVLink writes),
  2. raises its flag on every rank (a release store, system scope) and waits for every rank's flag
     on its own GPU (acquire loads),
  3. sums the slots in rank order, so every rank computes bitwise the same result.
The flags count calls (a per-block counter kept on the device, so a captured CUDA graph replays
correctly) and the buffer alternates between two halves by the count's parity: a rank can run at
most one call ahead of another (it needs the other's flag to finish a call), so the half it writes
is never one a peer is still reading.

`all_reduce_add_rmsnorm` does the same exchange one row per program and then, on the sum, the
residual add and RMSNorm that follow each of a layer's all-reduces (replicas.models.fused_norm's
arithmetic): one kernel where there were two. Inputs of more than MAX_PROGRAMS blocks (rows) run on
MAX_PROGRAMS programs that each push, signal and sum several blocks (rows).

Inputs larger than the buffer take NCCL (larger decode batches, prefill chunks: see
replicas.parallel.group.peer_max_bytes); the choice depends on the size alone, so all ranks choose
alike. A wait for a rank that died must not hang the GPU (no NCCL abort reaches
this kernel): the waits read a stop flag in pinned host memory, which abort() sets, and give up on
their own after a bound, leaving a flag the host reads (gave_up).
"""
from __future__ import annotations

import pickle

import torch
import triton
import triton.language as tl
from torch.multiprocessing.reductions import reduce_tensor

MAX_BLOCKS = 1024
BLOCK = 1024  # elements per program
# The most programs of one call: more blocks loop (the one-shot kernels at hundreds of programs
# took 0.4-1.3 ms a call in some runs on H200s, against 4-15 us in others).
MAX_PROGRAMS = 32
POLL_HOST_AFTER_NS = 200_000  # a wait this long starts reading the host's stop flag
WAIT_LIMIT_NS = 60 * 10**9  # longer than ranks drift apart at start-up (Triton compiles, graph captures)


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _push(x, offs, mask, half, ptrs, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Store x (this rank's values at `offs` of its slot) into every rank's buffer.
    ptrs: the addresses of every rank's data buffer, then of every rank's signals, then of this
    rank's status in pinned host memory ([0]: the host asks to stop waiting, [1]: a wait gave up)."""
    for p in tl.static_range(WORLD):
        peer = tl.load(ptrs + p).to(tl.pointer_type(x.dtype))
        tl.store(peer + (half * WORLD + RANK) * slot_elems + offs, x, mask=mask)


@triton.jit
def _signal_and_wait(pid, epoch, ptrs, RANK: tl.constexpr, WORLD: tl.constexpr, MAX_BLOCKS_: tl.constexpr,
                     WAIT_LIMIT: tl.constexpr, POLL_HOST_AFTER: tl.constexpr):
    """After this program's pushes: raise its flag on every rank, then wait until every rank's
    program `pid` has raised its flag here (the data reads that follow come after)."""
    tl.debug_barrier()  # every thread's stores come before the flags
    for p in tl.static_range(WORLD):
        peer_signal = tl.load(ptrs + WORLD + p).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(peer_signal + RANK * MAX_BLOCKS_ + pid, epoch, sem="release", scope="sys")
    own_signal = tl.load(ptrs + WORLD + RANK).to(tl.pointer_type(tl.int32))
    status = tl.load(ptrs + 2 * WORLD).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        flag = own_signal + p * MAX_BLOCKS_ + pid
        seen = tl.load(flag, volatile=True)
        if seen < epoch:
            start = _now_ns()
            spins = 0
            stop = 0
            while (seen < epoch) & (stop == 0):
                seen = tl.load(flag, volatile=True)
                spins += 1
                # A rank this late may be gone: now and then read the host's stop flag (over PCIe:
                # never on the fast path) and the clock's bound.
                if (spins % 256) == 0:
                    waited = _now_ns() - start
                    if waited > POLL_HOST_AFTER:
                        stop = tl.load(status, volatile=True) | (waited > WAIT_LIMIT).to(tl.int32)
            if seen < epoch:
                tl.store(status + 1, 1)
        tl.atomic_add(flag, 0, sem="acquire", scope="sys")  # the data reads below come after the flag
    tl.debug_barrier()


@triton.jit
def _slot_sum(inp, offs, mask, half, ptrs, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
              BLOCK_: tl.constexpr):
    """Every rank's values at `offs`, summed in rank order (float32) from this rank's buffer."""
    own_data = tl.load(ptrs + RANK).to(tl.pointer_type(inp.dtype.element_ty))
    acc = tl.zeros([BLOCK_], dtype=tl.float32)
    for p in tl.static_range(WORLD):
        acc += tl.load(own_data + (half * WORLD + p) * slot_elems + offs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _exchange(inp, x, offs, mask, pid, epoch, ptrs, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
              MAX_BLOCKS_: tl.constexpr, BLOCK_: tl.constexpr, WAIT_LIMIT: tl.constexpr,
              POLL_HOST_AFTER: tl.constexpr):
    """Program `pid`'s part of one call over one block: push, signal, wait, sum (float32)."""
    half = (epoch % 2).to(tl.int64)
    _push(x, offs, mask, half, ptrs, slot_elems, RANK, WORLD)
    _signal_and_wait(pid, epoch, ptrs, RANK, WORLD, MAX_BLOCKS_, WAIT_LIMIT, POLL_HOST_AFTER)
    return _slot_sum(inp, offs, mask, half, ptrs, slot_elems, RANK, WORLD, BLOCK_)


@triton.jit
def _one_shot_kernel(inp, out, n, ptrs, counters, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
                     MAX_BLOCKS_: tl.constexpr, BLOCK_: tl.constexpr, WAIT_LIMIT: tl.constexpr,
                     POLL_HOST_AFTER: tl.constexpr):
    pid = tl.program_id(0)
    epoch = tl.load(counters + pid) + 1
    offs = pid * BLOCK_ + tl.arange(0, BLOCK_)
    mask = offs < n
    x = tl.load(inp + offs, mask=mask)
    acc = _exchange(inp, x, offs, mask, pid, epoch, ptrs, slot_elems, RANK, WORLD, MAX_BLOCKS_, BLOCK_, WAIT_LIMIT,
                    POLL_HOST_AFTER)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)
    tl.store(counters + pid, epoch)


@triton.jit
def _one_shot_add_rmsnorm_kernel(inp, residual, weight, out, hidden, eps, ptrs, counters, slot_elems,
                                 RANK: tl.constexpr, WORLD: tl.constexpr, MAX_BLOCKS_: tl.constexpr,
                                 BLOCK_: tl.constexpr, WAIT_LIMIT: tl.constexpr, POLL_HOST_AFTER: tl.constexpr):
    """One program per row: the row's all-reduce, then replicas.models.fused_norm's add + RMSNorm
    on the sum, in the same arithmetic (the sum rounded to the model dtype first, as the
    all-reduce's output would be)."""
    row = tl.program_id(0)
    epoch = tl.load(counters + row) + 1
    cols = tl.arange(0, BLOCK_)
    mask = cols < hidden
    offs = row.to(tl.int64) * hidden + cols
    x = tl.load(inp + offs, mask=mask)
    acc = _exchange(inp, x, offs, mask, row, epoch, ptrs, slot_elems, RANK, WORLD, MAX_BLOCKS_, BLOCK_, WAIT_LIMIT,
                    POLL_HOST_AFTER)
    _add_rmsnorm_row(acc, residual, tl.load(weight + cols, mask=mask, other=0.0), out, offs, mask, hidden, eps)
    tl.store(counters + row, epoch)


@triton.jit
def _add_rmsnorm_row(acc, residual, w, out, offs, mask, hidden, eps):
    """One row's sum (float32, rounded to the model dtype first) + residual, stored back into the
    residual; its RMSNorm times w into out."""
    r = tl.load(residual + offs, mask=mask, other=0.0)
    total = (acc.to(r.dtype).to(tl.float32) + r.to(tl.float32)).to(r.dtype)
    tl.store(residual + offs, total, mask=mask)
    tf = total.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(tf * tf, axis=0) / hidden + eps)
    y = (tf * inv).to(total.dtype) * w
    tl.store(out + offs, y.to(out.dtype.element_ty), mask=mask)


# Inputs of more blocks (rows, for the fused kernel) than MAX_PROGRAMS take the kernels below: a
# grid of MAX_PROGRAMS programs, program p handling blocks p, p + MAX_PROGRAMS, ... and signalling
# once for all of them. A block keeps its program (block b: b % MAX_PROGRAMS, as in the one-shot
# kernels, whose blocks are fewer), so the halves' argument holds across both kinds of call.
@triton.jit
def _looped_kernel(inp, out, n, ptrs, counters, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
                   MAX_BLOCKS_: tl.constexpr, BLOCK_: tl.constexpr, PROGRAMS: tl.constexpr,
                   WAIT_LIMIT: tl.constexpr, POLL_HOST_AFTER: tl.constexpr):
    pid = tl.program_id(0)
    epoch = tl.load(counters + pid) + 1
    half = (epoch % 2).to(tl.int64)
    num_blocks = tl.cdiv(n, BLOCK_)
    for b in range(pid, num_blocks, PROGRAMS):
        offs = tl.arange(0, BLOCK_).to(tl.int64) + b * BLOCK_  # b * BLOCK_ < n: fits int32
        mask = offs < n
        _push(tl.load(inp + offs, mask=mask), offs, mask, half, ptrs, slot_elems, RANK, WORLD)
    _signal_and_wait(pid, epoch, ptrs, RANK, WORLD, MAX_BLOCKS_, WAIT_LIMIT, POLL_HOST_AFTER)
    for b in range(pid, num_blocks, PROGRAMS):
        offs = tl.arange(0, BLOCK_).to(tl.int64) + b * BLOCK_  # b * BLOCK_ < n: fits int32
        mask = offs < n
        acc = _slot_sum(inp, offs, mask, half, ptrs, slot_elems, RANK, WORLD, BLOCK_)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)
    tl.store(counters + pid, epoch)


@triton.jit
def _looped_add_rmsnorm_kernel(inp, residual, weight, out, rows, hidden, eps, ptrs, counters, slot_elems,
                               RANK: tl.constexpr, WORLD: tl.constexpr, MAX_BLOCKS_: tl.constexpr,
                               BLOCK_: tl.constexpr, PROGRAMS: tl.constexpr, WAIT_LIMIT: tl.constexpr,
                               POLL_HOST_AFTER: tl.constexpr):
    pid = tl.program_id(0)
    epoch = tl.load(counters + pid) + 1
    half = (epoch % 2).to(tl.int64)
    cols = tl.arange(0, BLOCK_)
    mask = cols < hidden
    for row in range(pid, rows, PROGRAMS):
        offs = cols.to(tl.int64) + row * hidden  # row * hidden < n: fits int32
        _push(tl.load(inp + offs, mask=mask), offs, mask, half, ptrs, slot_elems, RANK, WORLD)
    _signal_and_wait(pid, epoch, ptrs, RANK, WORLD, MAX_BLOCKS_, WAIT_LIMIT, POLL_HOST_AFTER)
    w = tl.load(weight + cols, mask=mask, other=0.0)
    for row in range(pid, rows, PROGRAMS):
        offs = cols.to(tl.int64) + row * hidden  # row * hidden < n: fits int32
        acc = _slot_sum(inp, offs, mask, half, ptrs, slot_elems, RANK, WORLD, BLOCK_)
        _add_rmsnorm_row(acc, residual, w, out, offs, mask, hidden, eps)
    tl.store(counters + pid, epoch)


def _open_on(device_index: int, shared) -> torch.Tensor:
    """A peer's tensor (reduce_tensor's output), mapped into this rank's device: opened under the
    peer's own device index (torch's default), the pointer would be valid only there, and this
    rank's kernels would fault on it."""
    rebuild, args = shared
    args = list(args)
    args[6] = device_index  # rebuild_cuda_tensor's storage_device
    return rebuild(*args)


class P2PAllReduce:
    """Built collectively by every rank of `group` (a CommGroup on CUDA devices of one node that can
    reach each other's memory); `all_reduce(t)` sums in place and `all_reduce_add_rmsnorm` sums and
    normalizes; every rank must make the same calls in the same order."""

    # Two channels, each with its own buffers, signals and counters: the plain kernel's programs
    # cover fixed element blocks, the fused one's whole rows, so one channel's parity argument (a
    # program's region is rewritten only after every rank has read its previous call) would not
    # hold across the two kernels.
    PLAIN, FUSED = 0, 1

    def __init__(self, group, max_bytes: int):
        self.rank, self.world, self.device = group.rank, group.size, group.device
        self.max_bytes = max_bytes
        channel_bytes = 2 * self.world * max_bytes  # [2 halves][world slots][max_bytes]
        channel_signals = self.world * MAX_BLOCKS
        # [2 channels] of the above on this rank; peers write their slots here.
        self.data = torch.zeros(2 * channel_bytes, dtype=torch.uint8, device=self.device)
        self.signals = torch.zeros(2 * channel_signals, dtype=torch.int32, device=self.device)
        self.counters = torch.zeros(2, MAX_BLOCKS, dtype=torch.int32, device=self.device)
        # [0]: set by abort() to end every wait; [1]: set by a wait that gave up. Pinned host memory,
        # which the kernel reads and writes directly: a spinning kernel cannot be stopped otherwise.
        self.status = torch.zeros(2, dtype=torch.int32, pin_memory=True)
        torch.cuda.synchronize(self.device)
        group.keys.set(f"p2p/{group.rank}", pickle.dumps((reduce_tensor(self.data), reduce_tensor(self.signals))))
        own = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._peer_buffers = []  # the mapped peer tensors, kept alive
        data_ptrs, signal_ptrs = [], []
        for r in range(self.world):
            if r == self.rank:
                data, signals = self.data, self.signals
            else:
                data, signals = (_open_on(own, shared) for shared in pickle.loads(group.keys.get(f"p2p/{r}")))
                self._peer_buffers += [data, signals]
            data_ptrs.append(data.data_ptr())
            signal_ptrs.append(signals.data_ptr())
        # Per channel: every rank's data, every rank's signals, this rank's status.
        self.ptrs = torch.tensor(
            [[d + c * channel_bytes for d in data_ptrs] + [s + c * channel_signals * 4 for s in signal_ptrs]
             + [self.status.data_ptr()] for c in (self.PLAIN, self.FUSED)], dtype=torch.int64, device=self.device)
        self._channels = tuple(zip(self.ptrs, self.counters))  # (ptrs, counters) views, made once
        group.all_reduce(torch.zeros(1, device=self.device))  # no rank returns before all have mapped

    def fits(self, t: torch.Tensor) -> bool:
        n = t.numel()
        return (t.is_contiguous() and n * t.element_size() <= self.max_bytes and -(-n // BLOCK) <= MAX_BLOCKS
                and t.dtype in (torch.bfloat16, torch.float16, torch.float32))

    def all_reduce(self, t: torch.Tensor) -> None:
        n = t.numel()
        blocks = triton.cdiv(n, BLOCK)
        ptrs, counters = self._channels[self.PLAIN]
        waits = dict(RANK=self.rank, WORLD=self.world, MAX_BLOCKS_=MAX_BLOCKS, BLOCK_=BLOCK, WAIT_LIMIT=WAIT_LIMIT_NS,
                     POLL_HOST_AFTER=POLL_HOST_AFTER_NS, num_warps=4)
        if blocks <= MAX_PROGRAMS:
            _one_shot_kernel[(blocks,)](t, t, n, ptrs, counters, self.max_bytes // t.element_size(), **waits)
        else:
            _looped_kernel[(MAX_PROGRAMS,)](t, t, n, ptrs, counters, self.max_bytes // t.element_size(),
                                            PROGRAMS=MAX_PROGRAMS, **waits)

    def fits_rows(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """The group's fused path takes x: [rows, hidden] up to the buffer; more than MAX_PROGRAMS rows
        take the looped kernel."""
        return (x.dim() == 2 and x.shape[1] <= 8192 and self.fits(x)
                and residual.is_contiguous() and residual.shape == x.shape and residual.dtype == x.dtype)

    def all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(sum(x) + residual), sum(x) + residual), with residual updated in place: the
        all-reduce of a layer's partial output and the add + norm after it, in one kernel."""
        rows, hidden = x.shape
        out = torch.empty_like(x)
        block = triton.next_power_of_2(hidden)
        ptrs, counters = self._channels[self.FUSED]
        slot_elems = self.max_bytes // x.element_size()
        waits = dict(RANK=self.rank, WORLD=self.world, MAX_BLOCKS_=MAX_BLOCKS, BLOCK_=block, WAIT_LIMIT=WAIT_LIMIT_NS,
                     POLL_HOST_AFTER=POLL_HOST_AFTER_NS, num_warps=8 if block >= 4096 else 4)
        if rows <= MAX_PROGRAMS:
            _one_shot_add_rmsnorm_kernel[(rows,)](x, residual, weight, out, hidden, eps, ptrs, counters, slot_elems,
                                                  **waits)
        else:
            _looped_add_rmsnorm_kernel[(MAX_PROGRAMS,)](x, residual, weight, out, rows, hidden, eps, ptrs, counters,
                                                        slot_elems, PROGRAMS=MAX_PROGRAMS, **waits)
        return out, residual

    def abort(self) -> None:
        """Every wait, running or to come, ends at once (a rank died: its flags will never come)."""
        self.status[0] = 1

    @property
    def gave_up(self) -> bool:
        """A wait ran out of time (a rank stopped taking part): every sum since is wrong."""
        return bool(self.status[1])
