"""Median engine step time by batch size, on the offline bench's workload (16 chat prompts,
outputs 16..127 tokens). Shows where a decode step's cost goes as the batch drains.

    python bench/step_times.py [--model M --load-format dummy --device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.offline import chat_prompts, output_lengths  # noqa: E402
from cluster import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    llm = LLM(model=args.model, load_format=args.load_format, tokenizer=args.tokenizer, device=args.device)
    engine = llm.engine
    prompts = chat_prompts(llm.get_tokenizer(), 16)
    lengths = output_lengths(16, 16, 127)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=4), use_tqdm=False)
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(f"step-{i}", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    by_batch: dict[int, list[float]] = defaultdict(list)
    while engine.has_unfinished_requests():
        load = engine.get_load()
        batch = load.num_running + load.num_waiting  # the first step (16) is the prefill
        start = time.perf_counter()
        engine.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        by_batch[batch].append(time.perf_counter() - start)
    print(f"{'batch':>5}{'steps':>7}{'median ms':>11}")
    for batch in sorted(by_batch):
        print(f"{batch:>5}{len(by_batch[batch]):>7}{statistics.median(by_batch[batch]) * 1e3:>11.1f}")


if __name__ == "__main__":
    main()
