"""GPU time of one decode sampling step: replicas.sampling_kernels.fused_sample (one Triton pass over the
bf16 logits) against the torch path the sampler used (float copy, logsumexp, divide by temperature, softmax,
exponential_, divide, argmax), for a few batch sizes at vocab 128256 (Llama 3) and 151936 (Qwen2).

Each step is captured in a CUDA graph and replayed, timed by CUDA events (so launch overhead is left out
for both); the same for plain eager calls. Prints microseconds per step and writes
bench/results/sampling-kernel-<gpu>.json.

    python bench/sampling_kernel.py [--reps 200] [--batches 1,8,64,256]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import machine, slug  # noqa: E402
from replicas.sampling_kernels import fused_sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def torch_path(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor):
    raw = logits[:, :vocab_size].float()
    lse = torch.logsumexp(raw, dim=-1)
    probs = torch.softmax(raw / temperature.unsqueeze(1), dim=-1)
    noise = torch.empty_like(probs).exponential_()
    tokens = (probs / noise).argmax(dim=-1)
    logprobs = raw.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse
    return tokens, logprobs


def eager_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def graph_us(fn, reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--vocabs", default="128256,151936")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    print(f"{'batch':>6} {'vocab':>7} {'mode':>7} {'torch graph':>12} {'fused graph':>12} "
          f"{'torch eager':>12} {'fused eager':>12}   (us per step)")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator(device=dev).manual_seed(batch)
            padded = vocab + 64   # the lm head's padded width: the sampler reads only the first `vocab`
            logits = (torch.randn(batch, padded, device=dev, generator=gen) * 4).to(torch.bfloat16)
            seeds = torch.arange(batch, device=dev, dtype=torch.int64) * 1000003
            offsets = torch.full((batch,), 17, device=dev, dtype=torch.int64)
            for mode in ("sample", "greedy"):
                temp = torch.full((batch,), 0.8 if mode == "sample" else 0.0, device=dev)

                def fused():
                    return fused_sample(logits, vocab, temp, seeds, offsets)

                def reference():
                    return torch_path(logits, vocab, temp.clamp_min(1e-5))

                row = {"batch": batch, "vocab": vocab, "mode": mode,
                       "torch_graph_us": graph_us(reference, args.reps), "fused_graph_us": graph_us(fused, args.reps),
                       "torch_eager_us": eager_us(reference, args.reps), "fused_eager_us": eager_us(fused, args.reps)}
                rows.append(row)
                print(f"{batch:>6} {vocab:>7} {mode:>7} {row['torch_graph_us']:>12.1f} {row['fused_graph_us']:>12.1f} "
                      f"{row['torch_eager_us']:>12.1f} {row['fused_eager_us']:>12.1f}", flush=True)
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"sampling-kernel-{slug(info['gpu'] or 'cpu')}.json"
    import triton

    out.write_text(json.dumps({"machine": info, "torch": torch.__version__, "triton": triton.__version__,
                               "reps": args.reps, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
