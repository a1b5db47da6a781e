"""All-reduce latency of a tensor-parallel group's two paths on the GPUs of one host: NCCL and the
one-shot peer-memory kernel (replicas.parallel.p2p_allreduce), each timed as a CUDA graph of
`--calls` back-to-back all-reduces (how a decode step runs them), after checking the peer sum
(against the inputs summed in float32 in rank order, and beside NCCL's);
and the peer all-reduce followed by the add + RMSNorm kernel beside the one kernel doing both.

    python bench/allreduce_latency.py --world 2 --rows 1 8 64 256 --hidden 4096
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed import TCPStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import device_name, slug  # noqa: E402
from replicas.parallel.group import CommGroup, Rendezvous  # noqa: E402
from replicas.models.fused_norm import add_rmsnorm  # noqa: E402
from replicas.parallel.p2p_allreduce import P2PAllReduce  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 1e-5


def _captured(fn, t: torch.Tensor, calls: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(t)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn(t)
    torch.cuda.synchronize()
    return graph


def _graph_sums_alike(peer: P2PAllReduce, x: torch.Tensor, expected: torch.Tensor) -> bool:
    """A captured peer all-reduce, replayed on fresh inputs, gives the expected sum every time."""
    static = x.clone()
    graph = _captured(peer.all_reduce, static, 1)
    alike = True
    for _ in range(3):
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        alike = alike and bool(torch.equal(static, expected))
    return alike


def _graph_us_per_call(fn, t: torch.Tensor, calls: int, replays: int) -> float:
    graph = _captured(fn, t, calls)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * calls) * 1e6


def _rank_order_sum(group: CommGroup, x: torch.Tensor) -> torch.Tensor:
    """What the peer kernel must return: every rank's input summed in float32 in rank order, then
    rounded once (NCCL's own order and rounding differ from it at 4 ranks)."""
    parts = [torch.empty_like(x) for _ in range(group.size)]
    group.pg.allgather([parts], [x]).wait()
    acc = torch.zeros_like(x, dtype=torch.float32)
    for part in parts:
        acc += part.float()
    return acc.to(x.dtype)


def _fused_like_split(peer: P2PAllReduce, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused all-reduce + add + RMSNorm equals the peer sum followed by the add + RMSNorm kernel
    (output and updated residual), eagerly and replayed in a graph."""
    summed, want_residual = x.clone(), residual.clone()
    peer.all_reduce(summed)
    want_out, _ = add_rmsnorm(summed, weight, EPS, want_residual)
    out, got_residual = peer.all_reduce_add_rmsnorm(x.clone(), residual.clone(), weight, EPS)
    alike = bool(torch.equal(out, want_out) and torch.equal(got_residual, want_residual))
    static_x, static_res, static_out = x.clone(), residual.clone(), torch.empty_like(x)
    graph = _captured(lambda t: static_out.copy_(peer.all_reduce_add_rmsnorm(t, static_res, weight, EPS)[0]),
                      static_x, 1)
    for _ in range(3):
        static_res.copy_(residual)
        graph.replay()
        torch.cuda.synchronize()
        alike = alike and bool(torch.equal(static_out, want_out) and torch.equal(static_res, want_residual))
    return alike


def _rank(rank: int, rdv: Rendezvous, args, queue) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = CommGroup(rdv, rank, "127.0.0.1", device)
    peer = P2PAllReduce(group, max_bytes=max(args.rows) * args.hidden * 2)  # every size timed here
    rows_out = []
    for rows in args.rows:
        gen = torch.Generator(device=device).manual_seed(rank * 1000 + rows)
        x = torch.randn((rows, args.hidden), generator=gen, device=device).to(torch.bfloat16)
        a, b = x.clone(), x.clone()
        group.pg.allreduce(a).wait()
        peer.all_reduce(b)
        want = _rank_order_sum(group, x)
        torch.cuda.synchronize()
        equal, nccl_equal = bool(torch.equal(b, want)), bool(torch.equal(a, b))
        graph_equal = _graph_sums_alike(peer, x, want)
        nccl_us = _graph_us_per_call(lambda t: group.pg.allreduce(t).wait(), x.clone(), args.calls, args.replays)
        peer_us = _graph_us_per_call(peer.all_reduce, x.clone(), args.calls, args.replays)
        # The same on every rank, as a layer's residual stream and norm weight are.
        same = torch.Generator(device=device).manual_seed(rows)
        residual = torch.randn((rows, args.hidden), generator=same, device=device).to(torch.bfloat16)
        weight = (1 + 0.1 * torch.randn(args.hidden, generator=same, device=device)).to(torch.bfloat16)
        fused_equal = _fused_like_split(peer, x, residual, weight)
        res = residual.clone()
        split_us = _graph_us_per_call(lambda t: (peer.all_reduce(t), add_rmsnorm(t, weight, EPS, res)), x.clone(),
                                      args.calls, args.replays)
        fused_us = _graph_us_per_call(lambda t: peer.all_reduce_add_rmsnorm(t, res, weight, EPS), x.clone(),
                                      args.calls, args.replays)
        if peer.gave_up:
            raise RuntimeError("a peer all-reduce wait gave up")
        rows_out.append({"rows": rows, "bytes": x.numel() * 2, "equal_to_rank_order_sum": equal,
                         "graph_equal_to_rank_order_sum": graph_equal, "equal_to_nccl": nccl_equal,
                         "fused_norm_equal_to_split": fused_equal,
                         "nccl_us": nccl_us, "peer_us": peer_us, "peer_then_norm_us": split_us,
                         "fused_peer_norm_us": fused_us})
    if rank == 0:
        queue.put(rows_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--out", default=None, help="where to write the JSON (default: bench/results/)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TCPStore("127.0.0.1", port, args.world, is_master=True, timeout=datetime.timedelta(seconds=120),
                     wait_for_workers=False)
    # The group's own choice of path off: both paths are called by hand here.
    rdv = Rendezvous("127.0.0.1", port, "bench-allreduce", "nccl", args.world, 120.0, peer_all_reduce=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, rdv, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    del store
    result = {"bench": "allreduce_latency", "device": device_name(), "world": args.world, "hidden": args.hidden,
              "calls_per_graph": args.calls, "levels": rows}
    path = Path(args.out) if args.out else RESULTS / f"allreduce-tp{args.world}-{slug(result['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"all-reduce, {args.world} x {result['device']}, bf16, per call inside a graph of {args.calls}:")
    print("(equal: the peer sum against every input summed in float32 in rank order; =NCCL: bitwise NCCL's)")
    print(f"{'rows':>6} {'bytes':>9} {'NCCL us':>9} {'peer us':>9} {'equal':>6} {'in graph':>9} {'=NCCL':>6} "
          f"{'peer+norm':>10} {'fused':>7} {'equal':>6}")
    for r in rows:
        print(f"{r['rows']:>6} {r['bytes']:>9} {r['nccl_us']:>9.2f} {r['peer_us']:>9.2f} "
              f"{str(r['equal_to_rank_order_sum']):>6} {str(r['graph_equal_to_rank_order_sum']):>9} "
              f"{str(r['equal_to_nccl']):>6} {r['peer_then_norm_us']:>10.2f} "
              f"{r['fused_peer_norm_us']:>7.2f} {str(r['fused_norm_equal_to_split']):>6}")


if __name__ == "__main__":
    main()
