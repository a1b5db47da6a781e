"""Decode attention (replicas.attention.triton_backend) at every split count over the keys, for the
head layouts of a model at each tensor-parallel size: time per layer call and the bandwidth of its
KV read, beside the split count the backend picks. Where a TP rank's fewer KV heads leave the GPU
short of programs, its attention stops halving with TP.

    python bench/attention_splits.py --batch 16 32 48 64 96 128 256 --context 1024 1536

Writes bench/results/attention-splits-<gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine, slug, versions  # noqa: E402
from replicas.attention.backend import AttentionMetadata  # noqa: E402
from replicas.attention.triton_backend import LaunchPlan, TritonAttentionBackend  # noqa: E402

PAGE = 16
SPLITS = (1, 2, 4, 8, 16, 32)
CALLS_PER_GRAPH = 16


def decode_batch(backend: TritonAttentionBackend, batch: int, context: int, device) -> tuple:
    """A paged cache holding `batch` sequences of `context` keys in shuffled blocks, and one decode
    token per sequence."""
    per_seq = -(-(context + 1) // PAGE)
    num_blocks = batch * per_seq
    cache = torch.randn((2, num_blocks, PAGE, backend.num_kv_heads, backend.head_dim), device=device,
                        dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int64).view(batch, per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context + 1, dtype=torch.int64, device=device)
    slots = tables[:, context // PAGE].long() * PAGE + context % PAGE
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(batch + 1, device=device),
                             seq_lens=seq_lens, block_tables=tables, seq_rows=torch.arange(batch, device=device),
                             max_query_len=1, max_seq_len=context + 1, block_size=PAGE)
    q = torch.randn((batch, backend.num_heads, backend.head_dim), device=device, dtype=torch.bfloat16)
    k = torch.randn((batch, backend.num_kv_heads, backend.head_dim), device=device, dtype=torch.bfloat16)
    return q, k, k.clone(), cache, meta


def time_layer(backend, q, k, v, cache, meta, splits: int) -> float:
    """Seconds per layer call (KV write, attention, merge) with `splits`, replayed in a graph."""
    plan = backend.plan(q.shape[0], q.shape[0], 1, meta.max_seq_len)
    meta.backend_state["plan"] = LaunchPlan(plan.grid[:2] + (splits,), plan.block_q, plan.block_m, plan.block_n,
                                            True, splits, plan.num_warps, plan.num_rows)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs, made on the default stream
    with torch.cuda.stream(stream):
        for _ in range(2):
            backend.forward(q, k, v, cache, meta, 0.088)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS_PER_GRAPH):
                backend.forward(q, k, v, cache, meta, 0.088)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / CALLS_PER_GRAPH)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="*", default=[16, 32, 48, 64, 96, 128, 256])
    ap.add_argument("--context", type=int, nargs="*", default=[1024, 1536])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_splits.py needs a CUDA GPU")
    device = torch.device("cuda")
    cfg = json.loads((REPO / "configs" / "models" / f"{args.model}.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rows = []
    print(f"{'tp':>3}{'batch':>6}{'ctx':>6}" + "".join(f"{f'{s} split us':>12}" for s in SPLITS)
          + f"{'picks':>6}{'best':>5}{'TB/s at pick':>13}")
    for tp in args.tp:
        backend = TritonAttentionBackend(heads // tp, max(1, kv // tp), head_dim, device, max(args.batch))
        most = max(args.batch) * max(SPLITS) * backend.num_heads
        backend.part_acc = torch.empty(most * head_dim, dtype=torch.float32, device=device)
        backend.part_stats = torch.empty(most * 2, dtype=torch.float32, device=device)
        for batch in args.batch:
            for context in args.context:
                q, k, v, cache, meta = decode_batch(backend, batch, context, device)
                us = {s: time_layer(backend, q, k, v, cache, meta, s) * 1e6 for s in SPLITS}
                picks = backend.splits_for(batch)
                kv_bytes = 2 * batch * (context + 1) * backend.num_kv_heads * head_dim * 2
                row = {"tp": tp, "batch": batch, "context": context, "us_by_splits": us, "picks": picks,
                       "best": min(us, key=us.get), "kv_tb_s_at_pick": kv_bytes / us[picks] / 1e6}
                rows.append(row)
                print(f"{tp:>3}{batch:>6}{context:>6}" + "".join(f"{us[s]:>12.1f}" for s in SPLITS)
                      + f"{picks:>6}{row['best']:>5}{row['kv_tb_s_at_pick']:>13.2f}", flush=True)
                del cache
    info = machine()
    result = {"bench": "attention_splits", "device": info["gpu"], "machine": info, "versions": versions(),
              "model": args.model, "dtype": "bfloat16", "rows": rows}
    path = Path(args.out) if args.out else REPO / "bench" / "results" / f"attention-splits-{slug(info['gpu'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
