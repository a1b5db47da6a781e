"""All-reduce latency of a tensor-parallel group's two paths on the GPUs of one host: NCCL and the
one-shot peer-memory kernel (replicas.parallel.p2p_allreduce), each timed as a CUDA graph of
`--calls` back-to-back all-reduces (how a decode step runs them), after checking they sum alike.

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
from replicas.parallel.p2p_allreduce import P2PAllReduce  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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
    """A captured peer all-reduce, replayed on fresh inputs, gives NCCL's sum every time."""
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


def _rank(rank: int, rdv: Rendezvous, args, queue) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = CommGroup(rdv, rank, "127.0.0.1", device)
    peer = P2PAllReduce(group)
    rows_out = []
    for rows in args.rows:
        gen = torch.Generator(device=device).manual_seed(rank * 1000 + rows)
        x = torch.randn((rows, args.hidden), generator=gen, device=device).to(torch.bfloat16)
        a, b = x.clone(), x.clone()
        group.pg.allreduce(a).wait()
        peer.all_reduce(b)
        torch.cuda.synchronize()
        equal = bool(torch.equal(a, b))
        graph_equal = _graph_sums_alike(peer, x, a)
        nccl_us = _graph_us_per_call(lambda t: group.pg.allreduce(t).wait(), x.clone(), args.calls, args.replays)
        peer_us = _graph_us_per_call(peer.all_reduce, x.clone(), args.calls, args.replays)
        if peer.gave_up:
            raise RuntimeError("a peer all-reduce wait gave up")
        rows_out.append({"rows": rows, "bytes": x.numel() * 2, "equal_to_nccl": equal,
                         "graph_equal_to_nccl": graph_equal,
                         "nccl_us": nccl_us, "peer_us": peer_us})
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
    print(f"{'rows':>6} {'bytes':>9} {'NCCL us':>9} {'peer us':>9} {'equal':>6} {'in graph':>9}")
    for r in rows:
        print(f"{r['rows']:>6} {r['bytes']:>9} {r['nccl_us']:>9.2f} {r['peer_us']:>9.2f} "
              f"{str(r['equal_to_nccl']):>6} {str(r['graph_equal_to_nccl']):>9}")


if __name__ == "__main__":
    main()
