"""Serving benchmark: streaming completions against a raylm HTTP endpoint.

Drives `/v1/completions` with `stream: true` at several concurrency levels, half the requests
text prompts and half prompt embeds of the same texts (base64 of torch.save bytes, as vLLM
clients send them), and measures output throughput, time to first token (TTFT) and
inter-token latency (ITL, p50/p90/p99). With --peer it also runs the same prompts through
Hugging Face transformers `generate` (one batch, greedy) for a throughput ratio line.

    python bench/serve.py --url http://127.0.0.1:8000/v1          # a running server
    python bench/serve.py --start --peer                           # start `raylm serve` itself

Writes bench/results/serve-<device>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.machine import device_name, machine, slug, versions  # noqa: E402

RESULTS = REPO / "bench" / "results"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three uses of copper.",
    "Once upon a time, in a small village by the mountains,",
    "What is the difference between weather and climate?",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "Give me a recipe idea that uses lentils and carrots.",
    "Why is the sky blue? Answer briefly.",
    "Summarize the plot of a detective story in two sentences.",
    "How do vaccines train the immune system?",
    "Describe a sunrise to someone who has never seen one.",
    "What are prime numbers? Give examples.",
    "Suggest a name for a bakery that sells only bread.",
    "The three laws of thermodynamics are",
    "In Python, a list comprehension is",
]


# ------------------------------------------------------------------------------ prompts

def load_hf(model_dir: str | None):
    """(tokenizer, model) of the served weights: a HF folder, or the embedded default's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        from replicas.loader import embedded_model_dir
        model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def embeds_of(tokenizer, model, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.get_input_embeddings()(ids).squeeze(0)


def b64_torch_save(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def request_bodies(model_id: str, embeds_b64: list[str], max_tokens: int) -> list[dict]:
    """Alternating text and embeds requests over the prompt set (embeds of the same texts)."""
    bodies = []
    for i, text in enumerate(PROMPTS):
        body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if i % 2 and embeds_b64:
            body.update(prompt="", prompt_embeds=embeds_b64[i])
        else:
            body.update(prompt=text)
        bodies.append(body)
    return bodies


# ------------------------------------------------------------------------------ one request

@dataclass
class Result:
    kind: str
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> Result:
    result = Result(kind="embeds" if "prompt_embeds" in body else "text")
    start = last = time.perf_counter()
    tokens = 0
    try:
        async with session.post(f"{url}/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw_line in resp.content:
                line = raw_line.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"].get("message")
                    return result
                usage = event.get("usage") or {}
                count = usage.get("completion_tokens", tokens + bool(event.get("choices")))
                if count > tokens and event.get("choices"):
                    now = time.perf_counter()
                    if tokens == 0:
                        result.ttft = now - start
                    else:  # a chunk carrying k tokens stands for k gaps of equal length
                        result.itls.extend([(now - last) / (count - tokens)] * (count - tokens))
                    last, tokens = now, count
                elif count > tokens:
                    tokens = count
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = tokens
    result.ok = tokens > 0
    return result


# ------------------------------------------------------------------------------ one level

def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


async def run_level(url: str, bodies: list[dict], concurrency: int, num_requests: int,
                    headers: dict) -> dict:
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=1800, sock_read=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def one(i: int) -> Result:
            async with gate:
                return await stream_one(session, url, bodies[i % len(bodies)], headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(num_requests)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency, "requests": num_requests, "ok": len(ok),
        "ok_text": sum(r.kind == "text" for r in ok), "ok_embeds": sum(r.kind == "embeds" for r in ok),
        "errors": sorted({r.error for r in results if not r.ok and r.error})[:5],
        "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "tpot_s": percentiles(tpots),
    }


# ------------------------------------------------------------------------------ the peer

def run_peer(tokenizer, model, max_tokens: int) -> dict:
    """HF transformers `generate` over the same prompts as embeds, one left-padded batch."""
    rows = [embeds_of(tokenizer, model, text) for text in PROMPTS]
    width, hidden = max(r.shape[0] for r in rows), rows[0].shape[1]
    inputs = torch.zeros(len(rows), width, hidden)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        inputs[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    kwargs = dict(inputs_embeds=inputs, attention_mask=mask, do_sample=False,
                  max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(**{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        out = model.generate(**kwargs)
        wall = time.perf_counter() - start
    tokens = out.shape[0] * out.shape[1]
    return {"engine": "transformers.generate", "batch": len(rows), "output_tokens": tokens,
            "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ a local server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`raylm serve` in a subprocess on a free port, logs in a temp file; stopped with SIGTERM."""

    def __init__(self, extra_args: list[str]):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="raylm-bench-serve-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), *extra_args],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            if "Ctrl-C to stop" in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"raylm serve exited early; log {self.log.name}:\n{text[-3000:]}")
            time.sleep(1)
        raise TimeoutError(f"raylm serve not ready after {timeout_s}s; log {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


# ------------------------------------------------------------------------------ main

def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def print_table(levels: list[dict], peer: dict | None) -> None:
    head = (f"{'conc':>4} {'ok':>7} {'tok/s':>8} {'req/s':>6} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
            f"{'ITL p50':>8} {'p90':>7} {'p99':>7}   (ms)")
    print(head)
    for lv in levels:
        t, i = lv["ttft_s"], lv["itl_s"]
        print(f"{lv['concurrency']:>4} {lv['ok']:>3}/{lv['requests']:<3} {lv['output_tokens_per_s']:>8.1f} "
              f"{lv['requests_per_s']:>6.2f} {fmt_ms(t['p50']):>9} {fmt_ms(t['p90']):>7} "
              f"{fmt_ms(t['p99']):>7} {fmt_ms(i['p50']):>8} {fmt_ms(i['p90']):>7} {fmt_ms(i['p99']):>7}")
        for err in lv["errors"]:
            print(f"     error: {err}")
    if peer:
        best = max(levels, key=lambda lv: lv["output_tokens_per_s"])
        ratio = best["output_tokens_per_s"] / peer["output_tokens_per_s"]
        print(f"peer transformers.generate (batch {peer['batch']}): "
              f"{peer['output_tokens_per_s']:.1f} tok/s; raylm best (concurrency "
              f"{best['concurrency']}): {best['output_tokens_per_s']:.1f} tok/s = {ratio:.2f}x the peer")


async def server_model(url: str, headers: dict) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(f"{url}/models", headers=headers) as resp:
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]


async def bench(args, url: str, bodies: list[dict], headers: dict) -> list[dict]:
    warm = await run_level(url, bodies, 1, 2, headers)  # first-request costs (compile, caches)
    if warm["ok"] < 2:
        raise RuntimeError(f"warm-up requests failed: {warm['errors']}")
    levels = []
    for c in args.concurrency:
        n = args.requests or max(8, 2 * c)
        levels.append(await run_level(url, bodies, c, n, headers))
        print(f"concurrency {c}: {levels[-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--start", action="store_true", help="start `raylm serve` on a free port")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra `raylm serve` argument with --start (repeatable), "
                             "e.g. --serve-arg=--num-cpus=1")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default max(8, 2 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-model", help="HF folder of the served weights, for embeds and the "
                                           "peer (default: the embedded SmolLM2-135M)")
    parser.add_argument("--no-embeds", action="store_true", help="text prompts only")
    parser.add_argument("--peer", action="store_true", help="also time transformers.generate")
    parser.add_argument("--api-key", default=os.environ.get("RAYLM_API_KEY"))
    parser.add_argument("--device", help="name of the serving device for the result file")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    hf = None if (args.no_embeds and not args.peer) else load_hf(args.hf_model)
    embeds_b64 = [] if args.no_embeds else [b64_torch_save(embeds_of(*hf, t)) for t in PROMPTS]

    server = LocalServer(args.serve_arg) if args.start else None
    try:
        if server:
            server.wait_ready()
        url = server.url if server else args.url.rstrip("/")
        model_id = asyncio.run(server_model(url, headers))
        bodies = request_bodies(model_id, embeds_b64, args.max_tokens)
        levels = asyncio.run(bench(args, url, bodies, headers))
    finally:
        if server:
            server.stop()  # frees the CPU for the peer
    peer = run_peer(*hf, args.max_tokens) if args.peer else None

    info = machine()
    device = args.device or device_name(info)
    print(f"raylm serve bench: model {model_id}, {args.max_tokens} output tokens per request "
          f"(ignore_eos), {'text only' if args.no_embeds else 'text and embeds prompts alternating'}, "
          f"on {device}")
    print_table(levels, peer)
    report = {
        "benchmark": "serve", "url": url, "model": model_id, "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS), "embeds": not args.no_embeds, "levels": levels, "peer": peer,
        "peer_ratio": (max(lv["output_tokens_per_s"] for lv in levels) / peer["output_tokens_per_s"]
                       if peer else None),
        "started_server": bool(server), "serve_args": args.serve_arg,
        "machine": info, "device": device, "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out or RESULTS / f"serve-{slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(lv["ok"] == lv["requests"] for lv in levels) else 1


if __name__ == "__main__":
    raise SystemExit(main())
