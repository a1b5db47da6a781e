"""The collectives of one tensor-parallel group: NCCL between GPUs, gloo between CPU processes.

Each group is its own torch process group built on a TCP store that rank 0 hosts, not
torch.distributed's process-wide default group, so one process may hold several engines (and
tests may build and drop them) without global state.
"""
from __future__ import annotations

import datetime
import os
import uuid
from dataclasses import dataclass

import torch
from torch.distributed import PrefixStore, ReduceOp, TCPStore

# A peer all-reduce sends (world - 1) copies of the tensor out of every rank, so the largest one
# that takes the peer kernel (larger ones take NCCL) shrinks with the world: this many bytes
# divided by the world size. Measured on H200s (bench/allreduce_latency.py, bf16, per call in a
# graph of 64): 2 ranks 4.4 us (8 KB) to 25 us (2 MB) against NCCL's 21-37 us; 4 ranks 7-30 us up
# to 1 MB against 32-42, and 51 against 42 at 2 MB. An 8B decode step of 256 rows at TP=2 took
# 8.3 ms with it, 9.3 ms with NCCL.
PEER_BYTES_TIMES_WORLD = 4 * 1024 * 1024


def peer_max_bytes(world_size: int) -> int:
    return int(os.environ.get("RAYLM_PEER_ALLREDUCE_MAX_BYTES", PEER_BYTES_TIMES_WORLD // world_size))


@dataclass
class Rendezvous:
    """Where the ranks of one group meet: rank 0's TCP store (plain data, sent to every worker)."""

    host: str
    port: int
    prefix: str
    backend: str  # "nccl" | "gloo"
    world_size: int
    timeout_s: float
    peer_all_reduce: bool = True  # NCCL groups: small all-reduces over peer memory (rank 0 decides for all)
    peer_max_bytes: int = 0  # the largest all-reduce that takes the peer path (host_store sets it)


def host_store(host: str, backend: str, world_size: int, timeout_s: float) -> tuple[TCPStore, Rendezvous]:
    """Rank 0's store, listening on a free port of `host`."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    return store, Rendezvous(host, store.port, f"raylm-tp-{uuid.uuid4().hex[:12]}", backend, world_size, timeout_s,
                             peer_all_reduce=os.environ.get("RAYLM_PEER_ALLREDUCE", "1") != "0",
                             peer_max_bytes=peer_max_bytes(world_size))


class CommGroup:
    """Blocking-on-the-host collectives for gloo; for NCCL, ordered on the current CUDA stream (and
    captured into CUDA graphs like any kernel)."""

    def __init__(self, rdv: Rendezvous, rank: int, own_host: str, device: torch.device,
                 store: TCPStore | None = None):
        timeout = datetime.timedelta(seconds=rdv.timeout_s)
        if store is None:
            store = TCPStore(rdv.host, rdv.port, rdv.world_size, is_master=False, timeout=timeout)
        self.store = store  # rank 0's keeps the rendezvous server alive
        prefixed = PrefixStore(rdv.prefix, store)
        self.rank, self.size, self.device = rank, rdv.world_size, device
        self.keys = prefixed  # this group's keys in the store
        self.peer = None  # the one-shot all-reduce over peer memory, for small tensors (NCCL groups)
        if rdv.backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            # A failed or aborted collective raises here rather than ending the process (torch's
            # default): the engine reports it, and a Serve replica is replaced.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = ProcessGroupNCCL(prefixed, rank, rdv.world_size, options)
            if rdv.peer_all_reduce:
                self.peer = peer_all_reduce(self, rdv.peer_max_bytes)
        elif rdv.backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            options = ProcessGroupGloo._Options()
            options._devices = [ProcessGroupGloo.create_device(hostname=own_host)]
            options._timeout = timeout
            self.pg = ProcessGroupGloo(prefixed, rank, rdv.world_size, options)
        else:
            raise ValueError(f"unknown tensor-parallel backend {rdv.backend!r}")

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum in place over the ranks."""
        if self.peer is not None and self.peer.fits(t):
            self.peer.all_reduce(t)
        else:
            self.pg.allreduce(t).wait()

    def fused_all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                     eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The peer path's one-kernel all_reduce(x) + residual add + RMSNorm (see RMSNorm.add_norm),
        or None where it does not apply (the caller then reduces and normalizes on its own). The
        choice depends on shapes alone, so all ranks choose alike."""
        if self.peer is None or residual is None or not self.peer.fits_rows(x, residual):
            return None
        return self.peer.all_reduce_add_rmsnorm(x, residual, weight, eps)

    def broadcast(self, t: torch.Tensor) -> None:
        """Rank 0's values, in place on every rank."""
        self.pg.broadcast(t, 0).wait()

    def all_gather(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """out[r * n:(r + 1) * n] = rank r's t (n = t.shape[0])."""
        self.pg._allgather_base(out, t).wait()

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.pg.allreduce(t, ReduceOp.MIN).wait()
        return int(t.item())

    def abort(self) -> None:
        """End the group: collectives pending on any rank fail instead of waiting for this one."""
        if self.peer is not None:
            self.peer.abort()
        try:
            self.pg.abort()
        except Exception:  # noqa: BLE001 - best effort while failing or shutting down
            pass


def peer_all_reduce(group: CommGroup, max_bytes: int):
    """The group's P2PAllReduce when every rank can map every other's memory (decided together:
    all ranks must take the same path), else None."""
    try:
        from replicas.parallel.p2p_allreduce import P2PAllReduce
    except ImportError:  # no triton
        P2PAllReduce = None
    index = group.device.index if group.device.index is not None else torch.cuda.current_device()
    group.keys.set(f"device/{group.rank}", str(index))
    peers = [int(group.keys.get(f"device/{r}")) for r in range(group.size) if r != group.rank]
    reachable = P2PAllReduce is not None and all(p != index and torch.cuda.can_device_access_peer(index, p) for p in peers)
    if not group.min_int(int(reachable)):
        return None
    return P2PAllReduce(group, max_bytes)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"
