"""Engine vs matmul peak vs naive materialisation, time and peak RSS, fp32 and bf16.

Run: .venv/bin/python benchmarks/engine_benchmark.py [--n-features 1024] [--full] [--no-softcap]

Every (approach, dtype) runs in its own subprocess so one approach's memory peak cannot
hide another's. Peak memory is VmHWM after the approach minus VmRSS before it, with the
high-water mark reset (``/proc/self/clear_refs`` = 5) once the inputs exist, so it is
the working memory beyond the inputs. Shapes default to Gemma-2-2B's logit lens:
d = 2304, n_b = 256000 vocab rows, tanh softcap 30.

* matmul: ``left_tile @ right.T`` into a reused buffer, tile by tile with the engine's
  tile size: the throughput ceiling for any exact engine.
* engine: ``core.engine.row_stats`` with every statistic.
* naive: ``s = left @ right.T`` whole, then topk / quantile / softmax / std_mean on it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import engine  # noqa: E402

D, N_B, SOFTCAP, K = 2304, 256_000, 30.0, 10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
APPROACHES = ("matmul", "engine", "naive")


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_matmul(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, budget: int) -> None:
    tile, _ = engine._plan(len(left), len(right), budget, dtype == torch.bfloat16, True)
    out = torch.empty(tile, len(right), dtype=dtype)
    for start in range(0, len(left), tile):
        rows = min(tile, len(left) - start)
        torch.matmul(left[start : start + rows].to(dtype), right.T, out=out[:rows])


def run_engine(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, budget: int, cap: bool) -> None:
    engine.row_stats(left, right, k=K, softcap=SOFTCAP if cap else None, compute_dtype=dtype, device="cpu", memory_budget_bytes=budget)


def run_naive(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, cap: bool) -> None:
    s = (left.to(dtype) @ right.T).float()
    if cap:
        s = torch.tanh(s / SOFTCAP) * SOFTCAP
    s.topk(K, dim=1)
    s.topk(K, dim=1, largest=False)
    torch.std_mean(s, dim=1)
    s.quantile(torch.tensor([0.5, 0.75]), dim=1, interpolation="lower")
    p = s.softmax(dim=1)
    p.max(1)
    -(p * p.clamp_min(1e-30).log()).sum(1)


def worker(approach: str, dtype_name: str, n_a: int, budget: int, cap: bool, repeats: int) -> None:
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    right = (torch.randn(N_B, D) / D**0.5).to(dtype)  # weights as stored; no conversion timed
    left = torch.randn(n_a, D)
    run = {
        "matmul": lambda x: run_matmul(x, right, dtype, budget),
        "engine": lambda x: run_engine(x, right, dtype, budget, cap),
        "naive": lambda x: run_naive(x, right, dtype, cap),
    }[approach]
    run(left[:8])  # warm-up: library initialisation, kernel selection
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_kib("VmRSS")
    seconds = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run(left)
        seconds = min(seconds, time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "peak_mib": (_proc_kib("VmHWM") - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-features", type=int, default=1024)
    parser.add_argument("--full", action="store_true", help="all 16384 features of a Gemma Scope SAE")
    parser.add_argument("--budget-mib", type=int, default=1024)
    parser.add_argument("--no-softcap", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="best time of this many runs per approach")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=APPROACHES)
    parser.add_argument("--worker", nargs=2, metavar=("APPROACH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_a = 16384 if args.full else args.n_features
    budget, cap = args.budget_mib << 20, not args.no_softcap
    if args.worker:
        worker(*args.worker, n_a, budget, cap, args.repeats)
        return

    flop = 2 * n_a * N_B * D
    print(f"n_a={n_a} n_b={N_B} d={D} k={K} softcap={cap} budget={args.budget_mib} MiB threads={torch.get_num_threads()} best of {args.repeats}")
    print(f"{'dtype':5} {'approach':8} {'seconds':>8} {'GFLOP/s':>8} {'vs peak':>8} {'peak MiB':>9}")
    for dtype_name in args.dtypes:
        results = {}
        for approach in args.approaches:
            cmd = [sys.executable, __file__, "--worker", approach, dtype_name, "--n-features", str(n_a), "--budget-mib", str(args.budget_mib), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd + ["--no-softcap"] * (not cap), check=True, capture_output=True, text=True).stdout
            results[approach] = r = json.loads(out.strip().splitlines()[-1])
            ratio = results["matmul"]["seconds"] / r["seconds"] if "matmul" in results else float("nan")
            print(f"{dtype_name:5} {approach:8} {r['seconds']:8.2f} {flop / r['seconds'] / 1e9:8.1f} {ratio:8.1%} {r['peak_mib']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
