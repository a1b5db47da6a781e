"""Scale-out on the GPUs of one host, in one run:

(a) tensor parallel: the Llama-3.1-8B shape (dummy bf16 weights) at TP=1, 2 (and 4): single-stream
    inter-token latency (one 128-token prompt, 256 output tokens) and the nano-vllm workload's
    output throughput (bench/gpu_workload.py: 256 requests, prompts and outputs of 100..1024 tokens);
(b) data parallel: the Llama-3.2-1B shape with 1, 2 (and 4) replicas behind Ray Serve's HTTP router:
    output throughput at 256 concurrent streams (prompts of 200 random token ids, 256 output tokens,
    ignore_eos), driven by several client processes; `--per-replica`: 256 streams per replica.

Every configuration runs in a child process of its own (a fresh Ray instance and a clean GPU).

    python bench/scale.py --tokenizer .devtok                    # both parts, every size the GPUs allow
    python bench/scale.py --tokenizer .devtok --skip-tp --direct # (b) on the Routers' direct port (no proxy)
    python bench/scale.py --tokenizer .devtok --tp 1 2 --dp 1 2  # pick sizes
    python bench/scale.py --tokenizer .devtok --skip-dp --tp-eager   # TP without CUDA graphs as well

Writes bench/results/scale-<gpu>-x<count>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"


# ------------------------------------------------------------------------------ (a) tensor parallel

def tp_child(args) -> dict:
    import ray
    import torch

    from bench.gpu_workload import workload
    from cluster.llm import LLM
    from replicas.sampling_params import SamplingParams

    ray.init(include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    llm = LLM(model=args.tp_model, load_format="dummy", tokenizer=args.tokenizer, max_model_len=args.max_model_len,
              max_num_batched_tokens=8192, tensor_parallel_size=args.child_size, enforce_eager=args.child_eager,
              gpu_memory_utilization=0.9)
    startup = time.perf_counter() - t0
    warm_prompts, warm_outputs = workload(16, 200, 200, seed=1)
    output_tok_s(llm, warm_prompts, warm_outputs)

    random.seed(2)
    prompt = {"prompt_token_ids": [random.randint(0, 10000) for _ in range(128)]}

    def timed(n: int) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - start

    timed(1)  # the prompt's blocks enter the prefix cache: every timed pair below starts from the same state
    itls = []
    for _ in range(3):  # (256 more tokens) / 256, the prefill and the first token cancelled out
        first, full = timed(1), timed(257)
        itls.append((full - first) / 256)
    prompts, outputs = workload(args.workload_seqs, args.workload_max_len, args.workload_max_len)
    throughput = output_tok_s(llm, prompts, outputs)
    runner = llm.engine.runner
    result = {"tensor_parallel_size": args.child_size, "cuda_graphs": runner.graphs is not None,
              "startup_s": startup, "kv_blocks": runner.num_blocks,
              "single_stream_itl_ms": statistics.median(itls) * 1e3, "itl_runs_ms": [x * 1e3 for x in itls],
              "workload_output_tok_s": throughput, "workload_output_tokens": sum(outputs)}
    if args.tp_profile:
        result["workload_phases"] = workload_phases(llm.engine, prompts, outputs)
    return result


PHASES = ((1, 32), (33, 64), (65, 128), (129, 192), (193, 256))


def workload_phases(engine, prompts: list[list[int]], outputs: list[int]) -> dict:
    """The workload once more, step by step: seconds and steps of those with prompt tokens to compute
    (prefill, decodes mixed in), then of decode-only steps by running batch size; where a TP
    speed-up is lost. New token ids of the same lengths, so the prefix cache (warm from the timed
    pass) does not skip the prefill."""
    import torch

    from replicas.sampling_params import SamplingParams

    rng = random.Random(3)
    prompts = [[rng.randint(0, 10000) for _ in p] for p in prompts]
    for i, (p, n) in enumerate(zip(prompts, outputs)):
        engine.add_request(f"phase-{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=n, temperature=0.6,
                                                                                 ignore_eos=True))
    phases: dict[str, list[float]] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        load = engine.get_load()
        prefill = load.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running)
        start = time.perf_counter()
        engine.step()
        took = time.perf_counter() - start
        if prefill:
            name = "prefill"
        else:
            name = next((f"decode {lo}-{hi}" for lo, hi in PHASES if lo <= load.num_running <= hi), "decode more")
        phase = phases.setdefault(name, [0, 0.0])
        phase[0] += 1
        phase[1] += took
    return {name: {"steps": n, "seconds": t, "mean_step_ms": t / n * 1e3} for name, (n, t) in phases.items()}


def output_tok_s(llm, prompts: list[list[int]], outputs: list[int]) -> float:
    """nano-vllm's sampling (temperature 0.6, every output to its full length), timed."""
    import torch

    from replicas.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.6, ignore_eos=True) for n in outputs]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == sum(outputs)
    return sum(outputs) / wall


# ------------------------------------------------------------------------------ (b) data parallel

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(url: str, bodies: list[bytes], concurrency: int, queue_at: list[int], ready,
                  start) -> tuple[int, int]:
    """Keep `concurrency` streams open until the shared list of bodies is used up; (tokens, errors).
    Says `ready` once its session is up and sends nothing before `start` (a multiprocessing Event)."""
    import aiohttp

    tokens = errors = 0

    async def worker(session):
        nonlocal tokens, errors
        while queue_at[0] < len(bodies):
            body = bodies[queue_at[0]]
            queue_at[0] += 1
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    errors += 1
                    await r.read()
                    continue
                usage = None
                async for line in r.content:
                    if line.startswith(b"data: {") and b'"completion_tokens"' in line:  # the usage chunk
                        usage = json.loads(line[6:]).get("usage") or usage
                tokens += (usage or {}).get("completion_tokens", 0)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        ready.put(None)
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return tokens, errors


def _client_process(url: str, bodies: list[bytes], concurrency: int, ready, start, out) -> None:
    import resource

    tokens, errors = asyncio.run(_client(url, bodies, concurrency, [0], ready, start))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((tokens, errors, usage.ru_utime + usage.ru_stime))


def host_cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all this host's cores, from /proc/stat (zeros where it is missing)."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def drive(url: str, bodies: list[bytes], concurrency: int, processes: int) -> dict:
    """Split the bodies and the streams over client processes (one asyncio loop cannot parse SSE as
    fast as several replicas write it); output tokens per second from the moment every client is
    connected (their start-up on a busy host is not the servers' time) to the last token."""
    ctx = multiprocessing.get_context("spawn")
    out, ready, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client_process,
                         args=(url, bodies[i::processes], concurrency // processes, ready, start, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    busy0, total0 = host_cpu_busy()
    t0 = time.perf_counter()
    start.set()
    results = [out.get() for _ in procs]
    wall = time.perf_counter() - t0
    busy1, total1 = host_cpu_busy()
    for p in procs:
        p.join()
    tokens = sum(r[0] for r in results)
    return {"wall_s": wall, "output_tokens": tokens, "errors": sum(r[1] for r in results),
            "output_tok_s": tokens / wall, "client_cpu_s": sum(r[2] for r in results),  # their start-up too
            "host_cpu_busy": (busy1 - busy0) / (total1 - total0) if total1 > total0 else None}


def replica_counters(base: str) -> dict[str, dict[str, float]]:
    """Each replica's requests started, engine steps and their summed wall time, from /metrics."""
    import requests

    text = requests.get(f"{base}/metrics", timeout=30).text
    found: dict[str, dict[str, float]] = {}
    for name, key in (("raylm_replica_requests_total", "requests"), ("raylm_replica_engine_steps_total", "steps"),
                      ("raylm_replica_engine_step_seconds_total", "step_seconds")):
        for m in re.finditer(rf'^{name}\{{replica="([^"]*)"[^}}]*\}} ([0-9.e+-]+)$', text, re.M):
            found.setdefault(m.group(1), {})[key] = float(m.group(2))
    return found


def per_replica(before: dict, after: dict, wall: float, max_tokens: int) -> list[dict]:
    """What each replica did in a run: its requests, steps, mean step, output tokens per step (about
    the mean decode batch) and the share of the run its engine spent stepping."""
    rows = []
    for replica, end in sorted(after.items()):
        start = before.get(replica, {})
        d = {k: end.get(k, 0.0) - start.get(k, 0.0) for k in ("requests", "steps", "step_seconds")}
        rows.append({"replica": replica, "requests": int(d["requests"]), "steps": int(d["steps"]),
                     "mean_step_ms": d["step_seconds"] / d["steps"] * 1e3 if d["steps"] else None,
                     "tokens_per_step": d["requests"] * max_tokens / d["steps"] if d["steps"] else None,
                     "busy": d["step_seconds"] / wall if wall else None})
    return rows


def dp_bodies(model_id: str, num: int, prompt_len: int, max_tokens: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps({"model": model_id, "prompt": [rng.randint(0, 10000) for _ in range(prompt_len)],
                        "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}).encode() for _ in range(num)]


def dp_child(args) -> dict:
    import ray
    import requests
    from ray import serve

    from bench.process_cpu import ProcessCPU
    from bench.serve import STATS_LAG_S  # the wait for the replicas' step counters to reach /metrics
    from cluster.app import run

    ray.init(include_dashboard=False, log_to_driver=False)
    gpu = bool(ray.cluster_resources().get("GPU"))  # else a CPU smoke run of this script
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    n = args.child_size
    scale = n if args.per_replica else 1
    concurrency, requests_total = args.concurrency * scale, args.requests * scale
    routers = (args.num_routers or 1) * n if args.per_replica else args.num_routers or n
    direct = free_port() if args.direct else None  # the Routers' own port (router.direct_http)
    t0 = time.perf_counter()
    run({"name": "raylm", "model": args.dp_model, "direct_port": direct, "direct_host": "127.0.0.1",
         "engine": {"load_format": "dummy", "tokenizer": args.tokenizer, "max_model_len": args.max_model_len},
         "num_replicas": n, "ray_actor_options": {"num_gpus": 1, "num_cpus": 2} if gpu else {"num_cpus": 1},
         "num_routers": routers, "max_ongoing_requests": concurrency,
         "max_queued_requests": 4 * concurrency})
    base = f"http://127.0.0.1:{port}"
    while requests.get(f"{base}/health", timeout=30).status_code != 200:
        time.sleep(1)
    startup = time.perf_counter() - t0
    model_id = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    url = f"http://127.0.0.1:{direct}/v1/completions" if direct else f"{base}/v1/completions"
    processes = args.client_processes * scale
    drive(url, dp_bodies(model_id, concurrency, args.prompt_len, 32, seed=1), concurrency,
          processes)  # warm every replica
    time.sleep(STATS_LAG_S)
    before = replica_counters(base)
    with ProcessCPU(os.getpid()) as cpu:
        result = drive(url, dp_bodies(model_id, requests_total, args.prompt_len, args.max_tokens), concurrency,
                       processes)
    time.sleep(STATS_LAG_S)
    result["per_replica"] = per_replica(before, replica_counters(base), result["wall_s"], args.max_tokens)
    result["process_cpu"] = {role: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                             for role, r in cpu.report(result["output_tokens"]).items()}
    serve.shutdown()
    ray.shutdown()
    return {"replicas": n, "routers": routers, "direct_port": bool(direct), "startup_s": startup,
            "concurrency": concurrency,
            "requests": requests_total, "prompt_tokens": args.prompt_len, "max_tokens": args.max_tokens, **result}


# ------------------------------------------------------------------------------ driver

def child(args, part: str, size: int, eager: bool = False) -> dict | None:
    cmd = [sys.executable, __file__, "--child", part, "--child-size", str(size), *args.passthrough]
    if eager:
        cmd.append("--child-eager")
    print(f"-- {part} {size}{' (eager)' if eager else ''}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
        return {"error": f"exit {proc.returncode}", "log_tail": proc.stderr[-2000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (the presets have none)")
    ap.add_argument("--tp", type=int, nargs="*", default=None, help="tensor-parallel sizes (default 1 2 4 as GPUs allow)")
    ap.add_argument("--dp", type=int, nargs="*", default=None, help="replica counts (default 1 2 4 as GPUs allow)")
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--tp-eager", action="store_true", help="also run each TP size without CUDA graphs")
    ap.add_argument("--tp-profile", action="store_true",
                    help="(a): run the workload once more step by step and report time by phase and batch size")
    ap.add_argument("--tp-model", default="llama-3.1-8b")
    ap.add_argument("--dp-model", default="llama-3.2-1b")
    ap.add_argument("--workload-seqs", type=int, default=256, help="(a): the nano-vllm workload's requests")
    ap.add_argument("--workload-max-len", type=int, default=1024, help="(a): its longest prompt and output")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--per-replica", action="store_true",
                    help="DP: --concurrency streams, --requests requests and --num-routers Routers (default 1) "
                         "per replica (N replicas: N times each)")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--num-routers", type=int, default=None, help="Router replicas (default: one per replica)")
    ap.add_argument("--client-processes", type=int, default=4)
    ap.add_argument("--direct", action="store_true", help="DP: HTTP to the Routers' direct port, not Serve's proxy")
    ap.add_argument("--child", choices=["tp", "dp"], help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-eager", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    for name in ("tokenizer", "tp_model", "dp_model"):  # Ray workers may start elsewhere: absolute paths
        value = getattr(args, name)
        if value and os.path.exists(value):
            setattr(args, name, os.path.abspath(value))
    if args.child:
        result = tp_child(args) if args.child == "tp" else dp_child(args)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # Ray's and NCCL's threads must not hold the process

    import torch

    from bench.machine import machine, slug, versions

    gpus = torch.cuda.device_count()
    if not gpus:
        sys.exit("bench/scale.py needs CUDA GPUs")
    sizes = [k for k in (1, 2, 4) if k <= gpus]
    args.passthrough = [a for a in sys.argv[1:]]
    info = machine()
    result = {"bench": "scale", "device": info["gpu"], "num_gpus": gpus, "gpus": [torch.cuda.get_device_name(i)
              for i in range(gpus)], "machine": info, "versions": versions(),
              "tensor_parallel": {"model": args.tp_model, "dtype": "bfloat16 (dummy weights)", "runs": []},
              "data_parallel": {"model": args.dp_model, "dtype": "bfloat16 (dummy weights)", "runs": []}}
    if not args.skip_tp:
        for k in args.tp if args.tp is not None else sizes:
            result["tensor_parallel"]["runs"].append(child(args, "tp", k))
            if args.tp_eager:
                result["tensor_parallel"]["runs"].append(child(args, "tp", k, eager=True))
    if not args.skip_dp:
        for n in args.dp if args.dp is not None else sizes:
            result["data_parallel"]["runs"].append(child(args, "dp", n))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"scale-{slug(info['gpu'])}-x{gpus}.json"
    if path.exists():  # runs split over several invocations (a command limit) add up in one file
        merge(result, json.loads(path.read_text()))
    summarize(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


def merge(result: dict, earlier: dict) -> None:
    """Keep the earlier file's successful runs of configurations this invocation did not run well."""
    for part, key in (("tensor_parallel", ("tensor_parallel_size", "cuda_graphs")), ("data_parallel", ("replicas",))):
        ran = {tuple(r.get(k) for k in key) for r in result[part]["runs"] if "error" not in r}
        kept = [r for r in earlier.get(part, {}).get("runs", [])
                if "error" not in r and tuple(r.get(k) for k in key) not in ran]
        result[part]["runs"] = kept + result[part]["runs"]


def summarize(result: dict) -> None:
    """Speed-ups against the one-GPU runs, beside the issue's targets."""
    tp = [r for r in result["tensor_parallel"]["runs"] if "error" not in r]
    base = {r["cuda_graphs"]: r for r in tp if r["tensor_parallel_size"] == 1}  # graphs vs graphs, eager vs eager
    if base:
        print(f"\n{'TP':>3}{'graphs':>8}{'ITL ms':>9}{'x TP1':>7}{'workload tok/s':>16}{'x TP1':>7}")
        for r in tp:
            one = base.get(r["cuda_graphs"])
            if one is None:
                continue
            r["itl_speedup"] = one["single_stream_itl_ms"] / r["single_stream_itl_ms"]
            r["throughput_speedup"] = r["workload_output_tok_s"] / one["workload_output_tok_s"]
            print(f"{r['tensor_parallel_size']:>3}{str(r['cuda_graphs']):>8}{r['single_stream_itl_ms']:>9.2f}"
                  f"{r['itl_speedup']:>7.2f}{r['workload_output_tok_s']:>16.0f}{r['throughput_speedup']:>7.2f}")
        print("targets: TP=2 ITL x1.7, workload x1.6")
        phased = [r for r in tp if "workload_phases" in r]
        names = sorted({n for r in phased for n in r["workload_phases"]}, key=_phase_order)
        if phased:
            print(f"\n{'phase':>14}" + "".join(f"{'TP' + str(r['tensor_parallel_size']) + ' s (steps, ms)':>26}"
                                             for r in phased))
            for name in names:
                cells = [r["workload_phases"].get(name) for r in phased]
                print(f"{name:>14}" + "".join(f"{c['seconds']:>10.2f} ({c['steps']:>5}, {c['mean_step_ms']:6.2f})"
                                              if c else f"{'-':>26}" for c in cells))
    dp = [r for r in result["data_parallel"]["runs"] if "error" not in r]
    one = next((r for r in dp if r["replicas"] == 1), None)
    if one:
        print(f"\n{'replicas':>8}{'tok/s':>10}{'x one':>7}{'per replica':>13}{'errors':>8}")
        for r in dp:
            r["speedup"] = r["output_tok_s"] / one["output_tok_s"]
            r["efficiency"] = r["speedup"] / r["replicas"]
            steps = [x["mean_step_ms"] for x in r.get("per_replica", []) if x["mean_step_ms"]]
            busy = [x["busy"] for x in r.get("per_replica", []) if x["busy"] is not None]
            batch = [x["tokens_per_step"] for x in r.get("per_replica", []) if x.get("tokens_per_step")]
            requests = [x["requests"] for x in r.get("per_replica", [])]
            host = r.get("host_cpu_busy")
            print(f"{r['replicas']:>8}{r['output_tok_s']:>10.0f}{r['speedup']:>7.2f}{r['efficiency']:>13.2f}"
                  f"{r['errors']:>8}  step ms {_span(steps, '.2f')}  tokens/step {_span(batch, '.0f')}"
                  f"  busy {_span(busy, '.2f')}"
                  f"  requests {_span(requests, 'd')}  host CPU {host if host is None else f'{host:.0%}'}")
        print("target: N replicas >= 0.9 N x one replica")


def _phase_order(name: str) -> int:
    return -1 if name == "prefill" else int(name.split()[1].split("-")[0]) if name[-1].isdigit() else 10**6


def _span(values: list, spec: str) -> str:
    """'lo-hi' of a per-replica figure ('-' when there is none)."""
    return f"{min(values):{spec}}-{max(values):{spec}}" if values else "-"


if __name__ == "__main__":
    main()
