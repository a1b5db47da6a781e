"""The one-row GEMV kernel (replicas/models/gemv.py) against F.linear (cuBLAS) on a model's weight
shapes, one tensor-parallel rank's share at each TP size: time per call and the bandwidth of its
weight read, bf16, one row (a decode step of one sequence).

Each timing replays a CUDA graph of calls that cycle through enough copies of the weight to miss
L2 every time (a decode step reads every layer's weights once, so none are cached then).

    python bench/gemv.py --model llama-3.1-8b --tp 1 2 4      # the table (F.linear vs kernel)
    python bench/gemv.py --sweep --tp 1 2                     # every kernel config
    python bench/gemv.py --sweep --gated --tp 1 2             # gate_up + SiLU: fused configs vs unfused
    python bench/gemv.py --rows 1 2 4 8 16 32 64 --tp 1 2     # cuBLAS per layer by batch rows
    python bench/gemv.py --skinny --rows 2 4 8 16 32 --tp 1 2   # skinny GEMM vs cuBLAS by rows
    python bench/gemv.py --skinny --sweep --tp 1 2            # skinny GEMM configs by row block

Writes bench/results/gemv-<gpu>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine, slug, versions  # noqa: E402
from replicas.models import gemv as kernel  # noqa: E402
from replicas.models import skinny_gemm  # noqa: E402
from replicas.models.fused_pointwise import silu_mul  # noqa: E402

L2_MISS_BYTES = 512 << 20  # weight copies cycled per graph: several times any GPU's L2
CALLS_PER_GRAPH = 64


def shapes(model: str, tp: int) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of one rank's weights: column-parallel qkv, gate_up and head, row-parallel o, down."""
    cfg = json.loads((REPO / "configs" / "models" / f"{model}.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_tp = max(1, kv // tp)
    return {"qkv": ((heads // tp + 2 * kv_tp) * head_dim, hidden), "o": (hidden, heads // tp * head_dim),
            "gate_up": (2 * inter // tp, hidden), "down": (hidden, inter // tp),
            "lm_head": (cfg["vocab_size"] // tp, hidden)}


def time_call(fn, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Seconds per call, replayed in a graph that cycles through `weights`."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in weights[:3]:  # compile and warm outside the capture
            fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            fn(x, weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(4):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / (4 * CALLS_PER_GRAPH))
    return best


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, -(-L2_MISS_BYTES // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(min(count, 64))]


def table(args) -> list[dict]:
    rows_out = []
    print(f"{'tp':>3}{'matrix':>9}{'N':>8}{'K':>7}{'cuBLAS us':>11}{'TB/s':>6}{'kernel us':>11}{'TB/s':>6}{'x':>6}"
          f"{'max err':>9}")
    for tp in args.tp:
        for name, (n, k) in shapes(args.model, tp).items():
            weights = weight_copies(n, k)
            nbytes = n * k * 2
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            t_blas = time_call(lambda x, w: F.linear(x, w), weights, x)
            config = kernel.MATRIX_CONFIGS.get(name, {})  # what the model's linear() uses for it
            t_kern = time_call(lambda x, w: kernel.gemv(x, w, **config), weights, x)
            ref = x.float() @ weights[0].float().T
            err = ((kernel.gemv(x, weights[0], **config).float() - ref).abs().max() / ref.abs().max()).item()
            row = {"tp": tp, "matrix": name, "n": n, "k": k, "cublas_us": t_blas * 1e6, "kernel_us": t_kern * 1e6,
                   "cublas_tb_s": nbytes / t_blas / 1e12, "kernel_tb_s": nbytes / t_kern / 1e12,
                   "speedup": t_blas / t_kern, "max_rel_err": err}
            rows_out.append(row)
            print(f"{tp:>3}{name:>9}{n:>8}{k:>7}{row['cublas_us']:>11.1f}{row['cublas_tb_s']:>6.2f}"
                  f"{row['kernel_us']:>11.1f}{row['kernel_tb_s']:>6.2f}{row['speedup']:>6.2f}{err:>9.1e}", flush=True)
            if name == "gate_up":  # the model's one-row MLP: this product with SiLU-mul in the same kernel
                unfused = time_call(lambda x, w: silu_mul(kernel.gemv(x, w)), weights, x)
                fused = time_call(kernel.gemv_silu_mul, weights, x)
                row.update(unfused_silu_us=unfused * 1e6, fused_silu_us=fused * 1e6)
                print(f"{'':>3}{'+ SiLU':>9}{'':>15}  gemv + silu_mul {unfused * 1e6:.1f} us, one kernel "
                      f"{fused * 1e6:.1f} us", flush=True)
            del weights
        layer = [r for r in rows_out if r["tp"] == tp and r["matrix"] != "lm_head"]
        blas, kern = sum(r["cublas_us"] for r in layer), sum(r["kernel_us"] for r in layer)
        print(f"    tp {tp}, one layer's four matrices: cuBLAS {blas:.1f} us, kernel {kern:.1f} us", flush=True)
    return rows_out


def time_configs(fn, configs: list[tuple], weights: list[torch.Tensor], x: torch.Tensor) -> dict[tuple, float]:
    """Seconds per call of fn(x, w, config) for each config; inf where it does not compile (shared
    memory)."""
    times = {}
    for c in configs:
        try:
            times[c] = time_call(lambda x, w, c=c: fn(x, w, c), weights, x)
        except Exception as e:  # noqa: BLE001
            times[c] = float("inf")
            print(f"  {c}: {type(e).__name__}", flush=True)
    return times


def gemv_config(fn):
    """fn(x, w, (block_n, block_k, warps, stages)) for the GEMV kernels, which take them by name."""
    return lambda x, w, c: fn(x, w, block_n=c[0], block_k=c[1], num_warps=c[2], num_stages=c[3])


def print_ranked(totals: dict[tuple, float], what: str) -> None:
    print(f"{what} by summed time, best first:")
    for c, t in sorted(totals.items(), key=lambda kv: kv[1])[:8]:
        print(f"  {c}: {t * 1e6:.1f} us")


def sweep(args) -> list[dict]:
    """Every config over the layer matrices at each TP size: the config whose summed time over them
    is least is the one to make the default."""
    cases = [(tp, name, n, k) for tp in args.tp for name, (n, k) in shapes(args.model, tp).items() if name != "lm_head"]
    configs = list(itertools.product((1, 2, 4, 8), (512, 1024, 2048), (2, 4, 8), (2, 3)))
    totals = {c: 0.0 for c in configs}
    results = []
    for tp, name, n, k in cases:
        weights = weight_copies(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        blas = time_call(lambda x, w: F.linear(x, w), weights, x)
        times = time_configs(gemv_config(kernel.gemv), configs, weights, x)
        for c, t in times.items():
            totals[c] += t
            results.append({"tp": tp, "matrix": name, "config": c, "us": t * 1e6})
        best = min(times, key=times.get)
        print(f"tp {tp} {name:>8} ({n}x{k}): cuBLAS {blas * 1e6:.1f} us, best {times[best] * 1e6:.1f} us {best}",
              flush=True)
        del weights
    print_ranked(totals, "configs (block_n, block_k, warps, stages)")
    return results


def gated_sweep(args) -> list[dict]:
    """gemv_silu_mul's configs on each TP size's gate_up against the two kernels it replaces
    (gemv then silu_mul, default configs)."""
    configs = list(itertools.product((1, 2, 4), (512, 1024, 2048), (4, 8), (2, 3)))
    totals = {c: 0.0 for c in configs}
    results = []
    for tp in args.tp:
        n, k = shapes(args.model, tp)["gate_up"]
        weights = weight_copies(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        unfused = time_call(lambda x, w: silu_mul(kernel.gemv(x, w)), weights, x)
        results.append({"tp": tp, "matrix": "gate_up", "config": "gemv + silu_mul", "us": unfused * 1e6})
        times = time_configs(gemv_config(kernel.gemv_silu_mul), configs, weights, x)
        for c, t in times.items():
            totals[c] += t
            results.append({"tp": tp, "matrix": "gate_up", "config": c, "us": t * 1e6})
        default = (kernel.GATED_BLOCK_N, kernel.BLOCK_K, kernel.NUM_WARPS, kernel.NUM_STAGES)
        best = min(times, key=times.get)
        print(f"tp {tp} gate_up ({n}x{k}): gemv + silu_mul {unfused * 1e6:.1f} us, fused default "
              f"{times[default] * 1e6:.1f} us, best {times[best] * 1e6:.1f} us {best}", flush=True)
        del weights
    print_ranked(totals, "fused configs (block_n, block_k, warps, stages)")
    return results


def rows_table(args) -> list[dict]:
    """cuBLAS on one layer's four matrices at each row count (a decode step's batch): how much of a
    TP speed-up the smaller per-rank GEMMs keep."""
    out = []
    print(f"{'rows':>5}" + "".join(f"{f'tp{tp} us':>11}{'TB/s':>6}" for tp in args.tp) + f"{'tp1/last':>9}")
    weights = {(tp, name): weight_copies(n, k) for tp in args.tp
               for name, (n, k) in shapes(args.model, tp).items() if name != "lm_head"}
    for m in args.rows:
        row = {"rows": m}
        line = f"{m:>5}"
        for tp in args.tp:
            total_us = total_bytes = 0.0
            for name, (n, k) in shapes(args.model, tp).items():
                if name == "lm_head":
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                total_us += time_call(lambda x, w: F.linear(x, w), weights[tp, name], x) * 1e6
                total_bytes += n * k * 2
            row[f"tp{tp}_us"] = total_us
            row[f"tp{tp}_tb_s"] = total_bytes / total_us / 1e6
            line += f"{total_us:>11.1f}{row[f'tp{tp}_tb_s']:>6.2f}"
        row["ratio"] = row[f"tp{args.tp[0]}_us"] / row[f"tp{args.tp[-1]}_us"]
        print(line + f"{row['ratio']:>9.2f}", flush=True)
        out.append(row)
    return out


def layer_matrices(args, tp: int) -> dict[str, tuple[int, int]]:
    return {name: nk for name, nk in shapes(args.model, tp).items() if name != "lm_head"}


def skinny_table(args) -> list[dict]:
    """The skinny GEMM (default configs) against cuBLAS on each matrix at each row count; the MLP's
    gate_up as the model runs it: cuBLAS + silu_mul against the fused kernel."""
    out = []
    print(f"{'rows':>5}{'tp':>3}{'matrix':>9}{'cuBLAS us':>11}{'TB/s':>6}{'skinny us':>11}{'TB/s':>6}{'x':>6}")
    weights = {(tp, name): weight_copies(n, k) for tp in args.tp for name, (n, k) in shapes(args.model, tp).items()}
    for m in args.rows:
        for tp in args.tp:
            layer_blas = layer_kern = 0.0
            for name, (n, k) in shapes(args.model, tp).items():
                w = weights[tp, name]
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                if name == "gate_up":
                    t_blas = time_call(lambda x, w: silu_mul(F.linear(x, w)), w, x)
                    t_kern = time_call(skinny_gemm.skinny_gemm_silu_mul, w, x)
                else:
                    config = skinny_gemm.MATRIX_CONFIGS.get(name)  # what the model's linear() uses
                    t_blas = time_call(lambda x, w: F.linear(x, w), w, x)
                    t_kern = time_call(lambda x, w: skinny_gemm.skinny_gemm(x, w, config=config), w, x)
                ref = x.float() @ w[0].float().T
                err = ((skinny_gemm.skinny_gemm(x, w[0]).float() - ref).abs().max() / ref.abs().max()).item()
                nbytes = n * k * 2
                row = {"rows": m, "tp": tp, "matrix": name, "n": n, "k": k, "cublas_us": t_blas * 1e6,
                       "skinny_us": t_kern * 1e6, "cublas_tb_s": nbytes / t_blas / 1e12,
                       "skinny_tb_s": nbytes / t_kern / 1e12, "speedup": t_blas / t_kern, "max_rel_err": err,
                       "with_silu_mul": name == "gate_up"}
                out.append(row)
                if name != "lm_head":
                    layer_blas, layer_kern = layer_blas + t_blas, layer_kern + t_kern
                print(f"{m:>5}{tp:>3}{name:>9}{row['cublas_us']:>11.1f}{row['cublas_tb_s']:>6.2f}"
                      f"{row['skinny_us']:>11.1f}{row['skinny_tb_s']:>6.2f}{row['speedup']:>6.2f}", flush=True)
            print(f"  rows {m} tp {tp}: one layer cuBLAS (+ silu_mul) {layer_blas * 1e6:.1f} us, skinny "
                  f"{layer_kern * 1e6:.1f} us", flush=True)
    return out


def skinny_sweep(args) -> list[dict]:
    """Every skinny GEMM config at each row block (the first row count given per block), summed
    over the layer's matrices at each TP size."""
    configs = [c for c in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 5))
               if not (c[0] == 16 and c[2] == 8)]
    results = []
    by_block = {}
    for m in args.rows:
        by_block.setdefault(skinny_gemm.block_m(m), m)
    for bm, m in by_block.items():
        totals = {c: 0.0 for c in configs}
        for tp in args.tp:
            for name, (n, k) in layer_matrices(args, tp).items():
                weights = weight_copies(n, k)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                blas = time_call(lambda x, w: F.linear(x, w), weights, x)
                fn = skinny_gemm.skinny_gemm_silu_mul if name == "gate_up" else skinny_gemm.skinny_gemm
                default = skinny_gemm.GATED_ROW_CONFIGS if name == "gate_up" else skinny_gemm.ROW_CONFIGS
                if name in skinny_gemm.MATRIX_CONFIGS:
                    default = dict.fromkeys(default, skinny_gemm.MATRIX_CONFIGS[name])
                times = time_configs(lambda x, w, c, fn=fn: fn(x, w, config=c), configs, weights, x)
                for c, t in times.items():
                    totals[c] += t
                    results.append({"rows": m, "block_m": bm, "tp": tp, "matrix": name, "config": c, "us": t * 1e6})
                best = min(times, key=times.get)
                print(f"rows {m} tp {tp} {name:>8} ({n}x{k}): cuBLAS {blas * 1e6:.1f} us, default "
                      f"{times.get(default.get(bm), float('nan')) * 1e6:.1f}, best {times[best] * 1e6:.1f} us {best}",
                      flush=True)
                del weights
        print_ranked(totals, f"rows {m} (block_m {bm}) configs (block_n, block_k, warps, stages)")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--gated", action="store_true", help="with --sweep: the gate_up GEMV fused with SiLU-mul")
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="cuBLAS per layer at these batch rows")
    ap.add_argument("--skinny", action="store_true", help="the few-row skinny GEMM: with --rows a table, with "
                    "--sweep its configs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemv.py needs a CUDA GPU")
    info = machine()
    result = {"bench": "gemv", "device": info["gpu"], "machine": info, "versions": versions(),
              "model": args.model, "dtype": "bfloat16",
              "config": {"block_n": kernel.BLOCK_N, "block_k": kernel.BLOCK_K, "num_warps": kernel.NUM_WARPS,
                         "num_stages": kernel.NUM_STAGES, "gated_block_n": kernel.GATED_BLOCK_N,
                         "by_matrix": kernel.MATRIX_CONFIGS}}
    if args.skinny:
        args.rows = args.rows or [2, 4, 8, 16, 32]
        result["skinny_configs"] = {str(bm): c for bm, c in skinny_gemm.ROW_CONFIGS.items()}
        result["skinny_gated_configs"] = {str(bm): c for bm, c in skinny_gemm.GATED_ROW_CONFIGS.items()}
        result["skinny_matrix_configs"] = skinny_gemm.MATRIX_CONFIGS
        result["skinny_sweep" if args.sweep else "skinny_by_rows"] = (skinny_sweep if args.sweep else skinny_table)(args)
    elif args.rows:
        result["cublas_by_rows"] = rows_table(args)
    elif args.sweep and args.gated:
        result["gated_sweep"] = gated_sweep(args)
    elif args.sweep:
        result["sweep"] = sweep(args)
    else:
        result["rows"] = table(args)
    path = Path(args.out) if args.out else REPO / "bench" / "results" / f"gemv-{slug(info['gpu'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
