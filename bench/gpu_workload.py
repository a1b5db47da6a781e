"""The nano-vllm workload on one GPU: raylm with token prompts, raylm with every prompt given as
embeds, and transformers' batched `generate`, beside the card's copy bandwidth and the workload's
roofline computed from it.

Workload: 256 requests, prompt and output lengths uniform in 100..1024 (random.seed(0)), prompt
tokens randint(0, 10000), ignore_eos, temperature 0.6 (nano-vllm's bench).

Roofline: every decode step reads the weights once plus the KV of every live sequence at the
measured copy bandwidth; prefill costs 2 * params FLOPs per prompt token at --peak-tflops.

    python bench/gpu_workload.py --model llama-3.2-1b --tokenizer .devtok
    python bench/gpu_workload.py --model llama-3.1-8b --tokenizer .devtok --skip-hf
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import device_name, machine, slug  # noqa: E402
from cluster.llm import LLM  # noqa: E402
from replicas.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def workload(num_seqs: int, max_input: int, max_output: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input))] for _ in range(num_seqs)]
    outputs = [random.randint(100, max_output) for _ in range(num_seqs)]
    return prompts, outputs


def copy_bandwidth(nbytes: int = 2 * 1024**3) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 20
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) / 1000)


def roofline_tok_s(llm: LLM, prompts: list[list[int]], outputs: list[int], bandwidth: float,
                   peak_flops: float) -> float:
    m = llm.engine.model_config
    params = sum(p.numel() for p in llm.engine.runner.model.parameters())
    weight_bytes = params * llm.engine.runner.model.embed_tokens.weight.element_size()
    kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * llm.engine.runner.model.embed_tokens.weight.element_size()
    seconds = sum(len(p) for p in prompts) * 2 * params / peak_flops
    for step in range(1, max(outputs) + 1):
        live = [len(p) + step for p, n in zip(prompts, outputs) if n >= step]
        seconds += (weight_bytes + sum(live) * kv_per_token) / bandwidth
    return sum(outputs) / seconds


def run_raylm(llm: LLM, prompts: list, outputs: list[int], temperature: float, cprofile: str | None = None) -> float:
    params = [SamplingParams(max_tokens=n, temperature=temperature, ignore_eos=True) for n in outputs]
    host = None
    if cprofile:
        import cProfile

        host = cProfile.Profile()
        host.enable()
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if host is not None:
        import pstats

        host.disable()
        print(f"== host profile: {cprofile} ({elapsed:.2f} s, profiled)")
        pstats.Stats(host).sort_stats("tottime").print_stats(22)
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    assert got == sum(outputs), f"raylm produced {got} tokens, expected {sum(outputs)}"
    return got / elapsed


def run_transformers(llm: LLM, prompts: list[list[int]], outputs: list[int], temperature: float,
                     batch: int) -> float:
    """Padded batched generate on the same weights; useful tokens (each request's own length) per second."""
    from bench.offline import build_hf_model

    model = build_hf_model(llm, "cuda", llm.engine.dtype)
    pad = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk, lengths = prompts[i:i + batch], outputs[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device="cuda")
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths),
                           min_new_tokens=max(lengths), do_sample=True, temperature=temperature, top_k=0,
                           pad_token_id=pad)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return sum(outputs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b", help="a preset from configs/models/ (dummy bf16 weights)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 FLOP/s for the prefill roofline")
    ap.add_argument("--skip-hf", action="store_true", help="leave transformers out (say so in the JSON)")
    ap.add_argument("--hf-batch", type=int, default=256, help="transformers' generate batch (memory)")
    ap.add_argument("--skip-embeds", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--cprofile", action="store_true",
                    help="after the timed runs, run tokens and embeds once more under cProfile and print both")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="raylm's share of the card (default 0.9, or 0.6 to leave transformers room)")
    args = ap.parse_args()
    utilization = args.gpu_memory_utilization or (0.9 if args.skip_hf else 0.6)

    bandwidth = copy_bandwidth()
    prompts, outputs = workload(args.num_seqs, args.max_input, args.max_output)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, load_format="dummy", tokenizer=args.tokenizer, max_model_len=4096,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              gpu_memory_utilization=utilization)
    startup_s = time.perf_counter() - t0
    roofline = roofline_tok_s(llm, prompts, outputs, bandwidth, args.peak_tflops * 1e12)

    warm_prompts, warm_outputs = workload(16, 200, 200, seed=1)
    run_raylm(llm, [{"prompt_token_ids": p} for p in warm_prompts], warm_outputs, args.temperature)
    token_tps = run_raylm(llm, [{"prompt_token_ids": p} for p in prompts], outputs, args.temperature)
    embeds_tps = None
    if not args.skip_embeds:
        embeds = [{"prompt_embeds": llm.get_input_embeddings(p)} for p in prompts]
        embeds_tps = run_raylm(llm, embeds, outputs, args.temperature)
        del embeds
    if args.cprofile:
        run_raylm(llm, [{"prompt_token_ids": p} for p in prompts], outputs, args.temperature, "tokens")
        embeds = [{"prompt_embeds": llm.get_input_embeddings(p)} for p in prompts]
        run_raylm(llm, embeds, outputs, args.temperature, "embeds")
        del embeds
    hf_tps = None if args.skip_hf else run_transformers(llm, prompts, outputs, args.temperature, args.hf_batch)

    result = {
        "bench": "gpu_workload",
        "device": device_name(),
        "model": args.model,
        "dtype": str(llm.engine.dtype),
        "attention_backend": llm.engine.runner.backend.name,
        "cuda_graphs": llm.engine.runner.graphs is not None,
        "num_seqs": args.num_seqs,
        "output_tokens": sum(outputs),
        "prompt_tokens": sum(len(p) for p in prompts),
        "temperature": args.temperature,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_blocks": llm.engine.runner.num_blocks,
        "startup_s": startup_s,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "roofline_tok_s": roofline,
        "raylm_output_tok_s": token_tps,
        "roofline_fraction": token_tps / roofline,
        "embeds_output_tok_s": embeds_tps,
        "embeds_vs_tokens": embeds_tps / token_tps if embeds_tps else None,
        "hf_output_tok_s": hf_tps,
        "hf_note": "skipped (--skip-hf)" if hf_tps is None else f"generate, batch {args.hf_batch}, same run",
        "raylm_vs_hf": token_tps / hf_tps if hf_tps else None,
        "machine": machine(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gpu-workload-{slug(args.model)}-{slug(result['device'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.model} (dummy {result['dtype']}) on {result['device']}, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'run':<22}{'output tok/s':>14}{'of roofline':>13}")
    for name, tps in [("roofline", roofline), ("raylm tokens", token_tps), ("raylm embeds", embeds_tps),
                      ("transformers", hf_tps)]:
        if tps is not None:
            print(f"{name:<22}{tps:>14.0f}{tps / roofline:>12.1%}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
