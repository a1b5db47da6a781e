"""Profile of decode steps on one GPU: wall time per step beside the GPU's kernel time per step
(the rest is launch overhead and the engine's Python), at a full decode batch.

    python bench/step_profile.py --model llama-3.2-1b --tokenizer .devtok --batch 256 --context 512
    python bench/step_profile.py --model llama-3.1-8b --tokenizer .devtok --batch 1 --tensor-parallel-size 2

With --tensor-parallel-size k the kernels are rank 0's (its NCCL all-reduces included), and the wall
time is the group's: where TP's single-stream decode goes (kernels, collectives, host gap).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_timeline import fill_batch  # noqa: E402
from bench.machine import device_name, slug  # noqa: E402
from cluster.llm import LLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--cprofile", action="store_true", help="also print the host functions that cost most")
    args = ap.parse_args()

    llm = LLM(model=args.model, load_format="dummy", tokenizer=args.tokenizer, max_model_len=4096,
              max_num_batched_tokens=8192, enforce_eager=args.enforce_eager,
              tensor_parallel_size=args.tensor_parallel_size)
    engine = llm.engine
    fill_batch(engine, args.batch, args.context, args.steps, args.temperature)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e6 / args.steps  # seconds per step
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    if args.cprofile:
        import cProfile
        import pstats

        host = cProfile.Profile()
        host.enable()
        for _ in range(args.steps):
            engine.step()
        host.disable()
        pstats.Stats(host).sort_stats("tottime").print_stats(18)
    for name in list(engine._requests):
        engine.abort_request(name)
    while engine.has_unfinished_requests():
        engine.step()

    tp = args.tensor_parallel_size
    if tp > 1:
        engine.runner.shutdown()
    result = {"bench": "step_profile", "device": device_name(), "model": args.model, "batch": args.batch,
              "tensor_parallel_size": tp,
              "context": args.context, "cuda_graphs": engine.runner.graphs is not None,
              "wall_ms_per_step": wall * 1e3, "gpu_kernel_ms_per_step": gpu_total * 1e3,
              "host_gap_ms_per_step": (wall - gpu_total) * 1e3, "decode_tok_s": args.batch / wall,
              "top_kernels_ms_per_step": {e.key[:80]: e.self_device_time_total / 1e3 / args.steps for e in top}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"-tp{tp}" if tp > 1 else ""
    path = RESULTS / f"step-profile-{slug(args.model)}-b{args.batch}{suffix}-{slug(result['device'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} batch {args.batch} context {args.context} graphs={result['cuda_graphs']}: "
          f"wall {wall * 1e3:.2f} ms/step, GPU kernels {gpu_total * 1e3:.2f} ms/step, "
          f"gap {(wall - gpu_total) * 1e3:.2f} ms/step, {args.batch / wall:.0f} tok/s")
    for k, v in result["top_kernels_ms_per_step"].items():
        print(f"  {v:8.3f} ms  {k}")


if __name__ == "__main__":
    main()
