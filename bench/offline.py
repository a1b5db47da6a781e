"""Offline throughput: the same chat prompts through raylm's LLM and through transformers' batched,
padded `generate`, on the same weights. Outputs vary in length (ignore_eos), so useful output
tokens per second is the figure; the ratio is raylm / transformers.

    python bench/offline.py                         # embedded default, CPU
    python bench/offline.py --model llama-3.2-1b --load-format dummy --device cuda
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import device_name, machine, slug, versions  # noqa: E402
from cluster import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["the capital of France", "photosynthesis", "the moon landing", "how rainbows form", "black holes",
          "the Roman empire", "machine learning", "volcanoes", "the water cycle", "honey bees",
          "the printing press", "jazz music", "plate tectonics", "the immune system", "chess openings",
          "the history of tea"]


def output_lengths(n: int, low: int, high: int) -> list[int]:
    return [low + round(i * (high - low) / (n - 1)) for i in range(n)]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        chat = [{"role": "user", "content": f"Please tell me about {TOPICS[i % len(TOPICS)]}."}]
        prompts.append(list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]))
    return prompts


def run_raylm(llm: LLM, prompts: list[list[int]], lengths: list[int]) -> tuple[float, int]:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def build_hf_model(llm: LLM, device: str, dtype: torch.dtype):
    """The same weights in transformers: the model folder when there is one, else ours copied over."""
    from transformers import AutoModelForCausalLM

    from replicas.loader import embedded_model_dir

    cfg = llm.engine.cfg
    if cfg.load_format != "dummy":
        folder = cfg.model or embedded_model_dir()
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    hf_config = llm.engine.model_config.hf_config
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    ours = llm.engine.runner.model
    state = {}
    for name, tensor in ours.state_dict().items():
        if ".qkv_proj." in name:
            m = llm.engine.model_config
            q, k, v = tensor.split([m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim,
                                    m.num_kv_heads * m.head_dim], 0)
            for part, t in zip("qkv", (q, k, v)):
                state["model." + name.replace("qkv_proj", f"{part}_proj")] = t
        elif ".gate_up_proj." in name:
            gate, up = tensor.chunk(2, 0)
            state["model." + name.replace("gate_up_proj", "gate_proj")] = gate
            state["model." + name.replace("gate_up_proj", "up_proj")] = up
        elif name.startswith("lm_head"):
            state[name] = tensor
        else:
            state["model." + name] = tensor
    model.load_state_dict(state, strict=False)
    return model


def run_transformers(model, tokenizer, prompts: list[list[int]], lengths: list[int], device: str) -> tuple[float, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    longest = max(lengths)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=pad)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, sum(lengths)  # tokens past each prompt's own length are padding work, not useful output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (dummy models default to the embedded one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=127)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    llm = LLM(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
              tokenizer=args.tokenizer, max_model_len=4096 if args.load_format == "dummy" else None)
    dtype = llm.engine.dtype
    tokenizer = llm.get_tokenizer()
    prompts = chat_prompts(tokenizer, args.num_prompts)
    lengths = output_lengths(args.num_prompts, args.min_tokens, args.max_tokens)
    run_raylm(llm, prompts[:2], [4, 4])  # warm-up

    hf = build_hf_model(llm, args.device, dtype)
    run_transformers(hf, tokenizer, prompts[:2], [4, 4], args.device)

    ray_times, hf_times = [], []
    for _ in range(args.repeats):
        t, ray_tokens = run_raylm(llm, prompts, lengths)
        ray_times.append(t)
        t, hf_tokens = run_transformers(hf, tokenizer, prompts, lengths, args.device)
        hf_times.append(t)
    ray_tps = ray_tokens / min(ray_times)
    hf_tps = hf_tokens / min(hf_times)
    ratio = ray_tps / hf_tps

    result = {
        "bench": "offline",
        "model": llm.engine.model_name,
        "load_format": args.load_format,
        "dtype": str(dtype),
        "num_prompts": args.num_prompts,
        "output_tokens": lengths,
        "useful_output_tokens": ray_tokens,
        "raylm_seconds": min(ray_times),
        "transformers_seconds": min(hf_times),
        "raylm_tokens_per_s": ray_tps,
        "transformers_tokens_per_s": hf_tps,
        "ratio": ratio,
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
        "versions": versions(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"offline-{slug(result['model'])}-{slug(result['device'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmodel {result['model']} ({result['dtype']}) on {result['device']}")
    print(f"{'engine':<14}{'seconds':>10}{'useful tok/s':>14}")
    print(f"{'raylm':<14}{min(ray_times):>10.2f}{ray_tps:>14.1f}")
    print(f"{'transformers':<14}{min(hf_times):>10.2f}{hf_tps:>14.1f}")
    print(f"ratio raylm / transformers: {ratio:.2f}x   -> {path}")
    del hf
    gc.collect()


if __name__ == "__main__":
    main()
