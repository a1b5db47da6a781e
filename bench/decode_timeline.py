"""A decode step's kernel timeline on one GPU, at each batch size: the step's wall time, the GPU's
span over its kernels, how many kernels it runs and which cost most (a CUDA trace per batch).

Where a small batch's step goes beyond its weight read: the kernels between the GEMVs and the
gaps between kernels. With programmatic dependent launch (replicas/pdl.py) kernels overlap their
predecessors' tails, so summed kernel times exceed the span; compare spans and walls.

    python bench/decode_timeline.py --model llama-3.1-8b --tokenizer .devtok --batch 1 8 64
    RAYLM_PDL=0 python bench/decode_timeline.py ...    # plain launches, for comparison

Writes bench/results/decode-timeline-<model>-<gpu>[-nopdl].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import device_name, machine, slug  # noqa: E402
from cluster.llm import LLM  # noqa: E402
from replicas.pdl import max_rows as pdl_max_rows  # noqa: E402
from replicas.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fill_batch(engine, batch: int, context: int, steps: int, temperature: float = 0.0) -> None:
    """`batch` requests of `context` prompt tokens (greedy by default), prefilled, so each of the
    next `steps` steps (and more) is a decode of all of them."""
    params = SamplingParams(max_tokens=4 * steps + 64, temperature=temperature, ignore_eos=True)
    for i in range(batch):
        ids = [(i * 7 + j + batch) % 10000 for j in range(context)]
        engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": ids}, params, final_only=True)
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) \
            or engine.scheduler.waiting or not engine.scheduler.running:
        engine.step()
    for _ in range(5):
        engine.step()


def kernel_events(engine, steps: int) -> list[dict]:
    """The CUDA kernels of `steps` engine steps, from a chrome trace, in start order."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    return sorted(events, key=lambda e: e["ts"])


def timeline(engine, batch: int, context: int, steps: int) -> dict:
    fill_batch(engine, batch, context, steps)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    events = kernel_events(engine, steps)
    span_us = (events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]) / steps
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        entry = by_name[e["name"][:80]]
        entry[0] += 1
        entry[1] += e["dur"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    for name in list(engine._requests):
        engine.abort_request(name)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch, "wall_ms_per_step": wall_ms, "gpu_span_ms_per_step": span_us / 1e3,
            "kernels_per_step": len(events) / steps,
            "summed_kernel_ms_per_step": sum(e["dur"] for e in events) / steps / 1e3,
            "top_kernels": [{"name": k, "per_step": n / steps, "us_each": us / n, "us_per_step": us / steps}
                            for k, (n, us) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="a preset or a config.json path (dummy weights)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    llm = LLM(model=args.model, load_format="dummy", tokenizer=args.tokenizer, max_model_len=4096,
              max_num_batched_tokens=8192)
    pdl = os.environ.get("RAYLM_PDL", "1") != "0"
    runs = []
    for batch in args.batch:
        r = timeline(llm.engine, batch, args.context, args.steps)
        runs.append(r)
        print(f"batch {batch}: wall {r['wall_ms_per_step']:.3f} ms/step, GPU span {r['gpu_span_ms_per_step']:.3f}, "
              f"{r['kernels_per_step']:.0f} kernels", flush=True)
        for k in r["top_kernels"][:8]:
            print(f"   {k['per_step']:5.0f} x {k['us_each']:7.2f} us  {k['name'][:70]}")
    result = {"bench": "decode_timeline", "device": device_name(), "machine": machine(), "model": args.model,
              "context": args.context, "pdl": pdl, "pdl_max_rows": pdl_max_rows(), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = Path(args.model).stem if args.model.endswith(".json") else args.model
    path = RESULTS / f"decode-timeline-{slug(name)}-{slug(result['device'])}{'' if pdl else '-nopdl'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
