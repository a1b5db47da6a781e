"""Serving benchmark: the same workload over HTTP, over Ray handles, and offline, in one run.

At each concurrency level, streaming `/v1/completions` requests over HTTP, a third each: text
prompts (JSON), prompt embeds as base64 torch.save in JSON (as vLLM clients send them), and prompt
embeds as raw bytes in a msgpack body. Measured as a client sees it: output tokens/s, time to first
token (TTFT), inter-token latency (ITL: a chunk carrying k tokens counts as k equal gaps) p50/p99.
Then the same requests through the Python handles (`cluster.connect()`): `Client.stream`
(threads, one per concurrent stream) and `ray.get(client.submit(...))`. The same workload through
the offline engine (`LLM.generate`, every request at once; the median of `--offline-runs` timings)
gives `offline_output_tok_s`, and one request through it alone the engine's decode step
(`engine_decode_step_s`), the floor of one stream's ITL. Each HTTP level also reports the served
engine's mean step (`served_engine_step_s`, from the replicas' step counters in /metrics): on a
machine whose cores the serving processes share, the engine's step while serving is slower than
offline, and ITL minus this step is what the serving path adds. The offline runs come first, in a
child process; then `raylm serve` starts.

    python bench/serve.py --start                                        # CPU, embedded model
    python bench/serve.py --start --model llama-3.2-1b --load-format dummy --num-gpus 1 \\
        --concurrency 1,16,64,256 --max-tokens 256                       # a GPU
    python bench/serve.py --start --direct ...    # also HTTP on the Routers' own port (no proxy)

Writes bench/results/serve-<device>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.machine import device_name, machine, slug, versions  # noqa: E402
from bench.process_cpu import ProcessCPU  # noqa: E402

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
KINDS = ("text", "embeds-json", "embeds-msgpack")


# ------------------------------------------------------------------------------ the workload

@dataclass
class Workload:
    """Request i: PROMPTS[i % 16] as KINDS[i % 3] (embeds: the prompt's input-embedding rows)."""

    token_ids: list[list[int]]
    embeds: list[np.ndarray]  # float32 (seq_len, hidden), one per prompt
    max_tokens: int

    def kind(self, i: int) -> str:
        return KINDS[i % len(KINDS)]

    def prompt(self, i: int) -> int:
        return i % len(PROMPTS)

    def offline_prompt(self, i: int):
        p = self.prompt(i)
        return PROMPTS[p] if self.kind(i) == "text" else {"prompt_embeds": torch.from_numpy(self.embeds[p])}


def params(max_tokens: int):
    from replicas.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_offline(args, num_requests: int) -> tuple[Workload, dict]:
    """The offline part in a child process, so its device memory is all given back before the
    server starts."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(offline_part, args, num_requests).result()


def offline_part(args, num_requests: int) -> tuple[Workload, dict]:
    """Build the offline engine, derive the workload's embeds from it, time the workload and one
    request alone (its decode steps)."""
    from cluster import LLM

    llm = LLM(model=args.model, load_format=args.load_format, **engine_options(args))
    tok = llm.get_tokenizer()
    ids = [list(tok(p).input_ids) for p in PROMPTS]
    work = Workload(ids, [llm.get_input_embeddings(t).float().cpu().numpy() for t in ids], args.max_tokens)
    llm.generate([work.offline_prompt(i) for i in range(min(4, num_requests))], params(4), use_tqdm=False)  # warm
    runs = []  # (wall, tokens): on a GPU one run is ~2 s of work and moves by tens of percent
    for _ in range(max(1, getattr(args, "offline_runs", 1))):
        start = time.perf_counter()
        outs = llm.generate([work.offline_prompt(i) for i in range(num_requests)], params(args.max_tokens),
                            use_tqdm=False)
        runs.append((time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)))
    wall, tokens = sorted(runs, key=lambda r: r[1] / r[0])[len(runs) // 2]  # the median run
    steps = decode_steps(llm.engine, work)
    return work, {"requests": num_requests, "output_tokens": tokens, "wall_s": wall,
                  "output_tokens_per_s": tokens / wall, "runs_output_tokens_per_s": [t / w for w, t in runs],
                  "engine_decode_step_s": percentiles(steps)}


def decode_steps(engine, work: Workload) -> list[float]:
    """Wall time of each engine step of one request alone, after its first token."""
    engine.add_request("bench-one", PROMPTS[0], params(work.max_tokens))
    times, produced = [], 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outs = engine.step()
        if produced:
            times.append(time.perf_counter() - start)
        produced += bool(outs)
    return times


def engine_options(args) -> dict:
    options = dict(args.engine)
    if args.tokenizer:
        options["tokenizer"] = args.tokenizer
    return options


# ------------------------------------------------------------------------------ HTTP requests

def b64_torch_save(a: np.ndarray) -> str:
    buf = io.BytesIO()
    torch.save(torch.from_numpy(a), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def http_bodies(work: Workload, model_id: str) -> list[tuple[str, bytes, str]]:
    """(kind, body bytes, content type) for each (prompt, kind) pair, encoded once."""
    bodies = []
    for i in range(len(PROMPTS) * len(KINDS)):
        p, kind = work.prompt(i), work.kind(i)
        body = {"model": model_id, "max_tokens": work.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if kind == "text":
            bodies.append((kind, json.dumps({**body, "prompt": PROMPTS[p]}).encode(), "application/json"))
        elif kind == "embeds-json":
            bodies.append((kind, json.dumps({**body, "prompt": "", "prompt_embeds": b64_torch_save(work.embeds[p])})
                           .encode(), "application/json"))
        else:
            e = work.embeds[p]
            raw = {"dtype": "float32", "shape": list(e.shape), "data": e.tobytes()}
            bodies.append((kind, msgpack.packb({**body, "prompt": "", "prompt_embeds": raw}, use_bin_type=True),
                           "application/msgpack"))
    return bodies


@dataclass
class Result:
    kind: str
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)

    def token(self, count: int, start: float, last: float) -> float:
        """`count` tokens arrived now; returns now."""
        now = time.perf_counter()
        if self.output_tokens == 0:
            self.ttft = now - start
        else:  # a chunk carrying k tokens stands for k gaps of equal length
            self.itls.extend([(now - last) / count] * count)
        self.output_tokens += count
        return now


async def stream_one(session: aiohttp.ClientSession, url: str, body, headers: dict) -> Result:
    kind, data, ctype = body
    result = Result(kind=kind)
    start = last = time.perf_counter()
    try:
        async with session.post(f"{url}/completions", data=data,
                                headers={**headers, "Content-Type": ctype}) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw_line in resp.content:
                line = raw_line.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = event["error"].get("message")
                    return result
                count = (event.get("usage") or {}).get("completion_tokens", 0) - result.output_tokens
                if count > 0 and event.get("choices"):
                    last = result.token(count, start, last)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


async def http_level(url: str, bodies: list, concurrency: int, num_requests: int, headers: dict) -> dict:
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def one(i: int) -> Result:
            async with gate:
                return await stream_one(s, url, bodies[i % len(bodies)], headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(num_requests)))
        wall = time.perf_counter() - start
    return summarize(concurrency, results, wall)


# ------------------------------------------------------------------------------ handle requests

def handle_prompts(work: Workload) -> list:
    """Request i's prompt for `cluster.connect()`: text, or an ObjectRef of its embeds (put once)."""
    import ray

    refs = [ray.put(e) for e in work.embeds]
    return [PROMPTS[work.prompt(i)] if work.kind(i) == "text" else {"prompt_embeds": refs[work.prompt(i)]}
            for i in range(len(PROMPTS) * len(KINDS))]


def handle_level(client, prompts: list, work: Workload, concurrency: int, num_requests: int,
                 how: str) -> dict:
    """`Client.stream` (how="stream") or `ray.get(client.submit(...))` (how="submit"), one thread per
    concurrent request."""
    import ray

    sp = params(work.max_tokens)
    counter = iter(range(num_requests))
    lock = threading.Lock()

    def next_index():
        with lock:
            return next(counter, None)

    def worker() -> list[Result]:
        out = []
        while (i := next_index()) is not None:
            r = Result(kind="text" if isinstance(prompts[i % len(prompts)], str) else "embeds")
            start = last = time.perf_counter()
            try:
                if how == "stream":
                    for delta in client.stream(prompts[i % len(prompts)], sp):
                        if delta.token_ids:
                            last = r.token(len(delta.token_ids), start, last)
                else:
                    final = ray.get(client.submit(prompts[i % len(prompts)], sp), timeout=3600)
                    r.output_tokens = len(final.outputs[0].token_ids)
                r.latency = time.perf_counter() - start
                r.ok = r.output_tokens > 0
            except Exception as exc:  # noqa: BLE001 - reported in the level's errors
                r.error = f"{type(exc).__name__}: {exc}"
            out.append(r)
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(lambda _: worker(), range(concurrency)) for r in rs]
    return summarize(concurrency, results, time.perf_counter() - start)


# ------------------------------------------------------------------------------ summaries

def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "ok_by_kind": {k: sum(r.kind == k for r in ok) for k in sorted({r.kind for r in results})},
        "errors": sorted({r.error for r in results if not r.ok and r.error})[:5],
        "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "latency_s": percentiles([r.latency for r in ok]),
    }


# ------------------------------------------------------------------------------ a local server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`raylm serve` in a subprocess on a free port, logs in a temp file; stopped with SIGTERM."""

    def __init__(self, serve_args: list[str], direct: bool = False):
        self.port = free_port()
        direct_port = free_port() if direct else None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="raylm-bench-serve-", suffix=".log", delete=False)
        extra = ["--direct-port", str(direct_port)] if direct_port else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--port", str(self.port), *extra, *serve_args],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.direct_url = f"http://127.0.0.1:{direct_port}/v1" if direct_port else None  # the Routers' own port
        self.ray_address: str | None = None

    def wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            if "Ctrl-C to stop" in text:
                m = re.search(r"raylm: Ray at ([^\s,;]+)", text)
                self.ray_address = m.group(1) if m else None
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


def serve_args(args) -> list[str]:
    out = list(args.serve_arg)
    if args.model:
        out += ["--model", args.model]
    options = engine_options(args)
    if args.load_format != "auto":
        options["load_format"] = args.load_format
    out += [f"--engine={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items()]
    if args.num_gpus:
        out += ["--num-gpus", str(args.num_gpus)]
    if args.num_replicas:
        out += ["--num-replicas", str(args.num_replicas)]
    return out


# ------------------------------------------------------------------------------ main

def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def print_table(title: str, levels: list[dict]) -> None:
    print(f"{title}\n{'conc':>4} {'ok':>9} {'tok/s':>8} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} "
          f"{'step':>7}   (ms; step: the served engine's mean step)")
    for lv in levels:
        t, i, step = lv["ttft_s"], lv["itl_s"], lv.get("served_engine_step_s")
        print(f"{lv['concurrency']:>4} {lv['ok']:>4}/{lv['requests']:<4} {lv['output_tokens_per_s']:>8.1f} "
              f"{fmt_ms(t['p50']):>9} {fmt_ms(t['p99']):>7} {fmt_ms(i['p50']):>8} {fmt_ms(i['p99']):>7} "
              f"{fmt_ms(step) if step else '-':>7}")
        for err in lv["errors"]:
            print(f"     error: {err}")
        cpu = lv.get("process_cpu")
        if cpu:
            print("     CPU: " + ", ".join(f"{role} x{r['processes']} {r['us_per_output_token']:.0f} us/token "
                                         f"(busiest {r['max_util']:.2f} cores)"
                                         for role, r in sorted(cpu.items()) if r["cpu_s"] > 0.05))


async def server_model(url: str, headers: dict) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(f"{url}/models", headers=headers) as resp:
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]


STATS_LAG_S = 2.5  # Serve's routing-stats poll (the app's default 2 s), which carries the step counters


async def engine_step_totals(url: str, headers: dict) -> tuple[float, float]:
    """(steps, seconds) the replicas' engines have run, summed, from /metrics."""
    base = url.removesuffix("/v1")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(f"{base}/metrics", headers=headers) as resp:
            text = await resp.text()
    total = {"steps": 0.0, "step_seconds": 0.0}
    for name in total:
        for m in re.finditer(rf"^raylm_replica_engine_{name}_total\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M):
            total[name] += float(m.group(1))
    return total["steps"], total["step_seconds"]


def with_served_step(url: str, headers: dict, run_level) -> dict:
    """run_level()'s result with `served_engine_step_s`: the mean wall time of the engine steps the
    level made the replicas run (the step as it runs while serving, beside the offline one)."""
    time.sleep(STATS_LAG_S)
    steps0, seconds0 = asyncio.run(engine_step_totals(url, headers))
    level = run_level()
    time.sleep(STATS_LAG_S)
    steps1, seconds1 = asyncio.run(engine_step_totals(url, headers))
    level["served_engine_step_s"] = (seconds1 - seconds0) / (steps1 - steps0) if steps1 > steps0 else None
    return level


def count(args, c: int) -> int:
    return args.requests or max(12, 2 * c)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="a running server (without --start)")
    parser.add_argument("--ray-address", help="its Ray cluster, for the handle levels (default: auto)")
    parser.add_argument("--start", action="store_true", help="start `raylm serve` on a free port")
    parser.add_argument("--model", help="served and offline model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--load-format", default="auto", help="'dummy' with a preset from configs/models/")
    parser.add_argument("--tokenizer", help="tokenizer folder (dummy presets: default the embedded one)")
    parser.add_argument("--engine", type=engine_kv, action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option for both the server and the offline engine")
    parser.add_argument("--num-gpus", type=float, help="GPUs per replica (with --start)")
    parser.add_argument("--num-replicas", type=int, help="replicas (with --start)")
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `raylm serve` argument")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default max(12, 2 x c))")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--offline-runs", type=int, default=3,
                        help="time the offline workload this many times; the median run is the figure")
    parser.add_argument("--no-handles", action="store_true", help="HTTP only")
    parser.add_argument("--direct", action="store_true",
                        help="with --start: also run the HTTP levels on the Routers' direct port (--direct-port)")
    parser.add_argument("--api-key", default=os.environ.get("RAYLM_API_KEY"))
    parser.add_argument("--device", help="name of the serving device for the result file")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    work, offline = run_offline(args, count(args, max(args.concurrency)))
    print(f"offline: {offline['output_tokens_per_s']:.1f} tok/s over {offline['requests']} requests; "
          f"decode step alone p50 {fmt_ms(offline['engine_decode_step_s']['p50'])} ms", flush=True)

    server = LocalServer(serve_args(args), direct=args.direct) if args.start else None
    levels, direct_levels, handle_levels, submit_levels = [], [], [], []
    try:
        if server:
            server.wait_ready()
        url = server.url if server else args.url.rstrip("/")
        model_id = asyncio.run(server_model(url, headers))
        bodies = http_bodies(work, model_id)
        warm = asyncio.run(http_level(url, bodies, 3, 3, headers))  # one of each kind
        if warm["ok"] < 3:
            raise RuntimeError(f"warm-up requests failed: {warm['errors']}")
        for c in args.concurrency:
            with ProcessCPU(server.proc.pid if server else None) as cpu:
                levels.append(with_served_step(url, headers, lambda: asyncio.run(
                    http_level(url, bodies, c, count(args, c), headers))))
            levels[-1]["process_cpu"] = cpu.report(levels[-1]["output_tokens"])
            print(f"HTTP concurrency {c}: {levels[-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
        for c in args.concurrency if server and server.direct_url else []:
            with ProcessCPU(server.proc.pid) as cpu:
                direct_levels.append(with_served_step(server.direct_url, headers, lambda: asyncio.run(
                    http_level(server.direct_url, bodies, c, count(args, c), headers))))
            direct_levels[-1]["process_cpu"] = cpu.report(direct_levels[-1]["output_tokens"])
            print(f"HTTP direct concurrency {c}: {direct_levels[-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
        if not args.no_handles:
            from cluster.cli import connect_ray
            from cluster.client import connect

            connect_ray((server.ray_address if server else None) or args.ray_address or "auto")
            client = connect()
            prompts = handle_prompts(work)
            handle_level(client, prompts, work, 1, 2, "stream")  # warm this process's handle
            for c in args.concurrency:
                handle_levels.append(handle_level(client, prompts, work, c, count(args, c), "stream"))
                submit_levels.append(handle_level(client, prompts, work, c, count(args, c), "submit"))
                print(f"handle concurrency {c}: stream {handle_levels[-1]['output_tokens_per_s']:.1f} tok/s, "
                      f"submit {submit_levels[-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # leave the cluster before the server takes it down
        if server:
            server.stop()

    info = machine()
    device = args.device or device_name(info)
    print(f"raylm serve bench: model {model_id}, {args.max_tokens} output tokens per request (ignore_eos), "
          f"prompts as {', '.join(KINDS)} in turn, on {device}")
    print(f"offline LLM.generate: {offline['output_tokens_per_s']:.1f} tok/s; engine decode step (one request) "
          f"p50 {fmt_ms(offline['engine_decode_step_s']['p50'])} ms")
    print_table("HTTP (SSE)", levels)
    if direct_levels:
        print_table("HTTP (SSE) on the Routers' direct port (no proxy hop)", direct_levels)
    if handle_levels:
        print_table("Client.stream (Ray handle)", handle_levels)
        print_table("ray.get(Client.submit) (no TTFT/ITL: one result)", submit_levels)
    report = {
        "benchmark": "serve", "url": url, "model": model_id, "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS), "prompt_kinds": list(KINDS), "device": device,
        "offline_output_tok_s": offline["output_tokens_per_s"], "offline": offline,
        "engine_decode_step_s": offline["engine_decode_step_s"],
        "levels": levels, "direct_levels": direct_levels,
        "handle_stream_levels": handle_levels, "handle_submit_levels": submit_levels,
        "started_server": bool(server), "serve_args": serve_args(args) if server else None,
        "machine": info, "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out or RESULTS / f"serve-{slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    every = levels + direct_levels + handle_levels + submit_levels
    return 0 if all(lv["ok"] == lv["requests"] for lv in every) else 1


def engine_kv(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), yaml.safe_load(value)


if __name__ == "__main__":
    raise SystemExit(main())
