"""Engine vs the machine's best matmul vs the naive approach: time and peak memory, fp32 and bf16.

Run: .venv/bin/python benchmarks/engine_benchmark.py [--n-features 1024] [--full] [--no-softcap]
                                                     [--device cpu|cuda] [--vocab 256000]

Every (approach, dtype) runs in its own subprocess so one approach's memory peak cannot hide another's.
Peak memory on the CPU is VmHWM after the approach minus VmRSS before it, with the high-water mark reset
(``/proc/self/clear_refs`` = 5) once the inputs exist, so it is the working memory beyond the inputs; on CUDA
it is ``torch.cuda.max_memory_allocated`` beyond the inputs. Shapes default to Gemma-2-2B's logit lens:
d = 2304, n_b = 256000 vocabulary rows, tanh softcap 30.

* best: the fastest way found on this machine to do the same FLOPs, ``left[rows] @ right[cols].T`` into a
  reused buffer over a grid of (feature rows, vocabulary columns) block shapes — cache-sized blocks beat
  full-vocabulary rows on CPUs. The grid is timed on a slice of the features, the winner on all of them; the
  block shape it found is printed. It computes no statistic: the floor any exact engine is measured against.
* matmul: the same with the engine's own tile (its rows × the whole vocabulary): what the engine's tiling
  costs before any statistic.
* engine: ``core.compute.engine.row_stats`` with every statistic.
* naive: what a user writes — ``s = left @ right.T`` whole, then top-k / quantiles / softmax / std_mean on it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.compute import engine  # noqa: E402

D, N_B, SOFTCAP, K = 2304, 256_000, 30.0, 10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
APPROACHES = ("best", "matmul", "engine", "naive")
BLOCK_ROWS = (256, 512, 1024, 2048)
BLOCK_COLS = (2048, 4096, 8192, 16384, 32768, None)  # None: the whole vocabulary


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def blocked_matmul(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, rows: int, cols: int | None) -> None:
    """``left @ right.T`` in (rows × cols) output blocks written into one reused buffer."""
    cols = cols or len(right)
    out = torch.empty(rows, cols, dtype=dtype, device=right.device)
    for r0 in range(0, len(left), rows):
        block = left[r0 : r0 + rows].to(right.device, dtype)
        for c0 in range(0, len(right), cols):
            part = right[c0 : c0 + cols]
            torch.matmul(block, part.T, out=out[: len(block), : len(part)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def best_block(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> tuple[int, int | None]:
    """The (rows, cols) block shape of ``blocked_matmul`` with the highest throughput on a slice of ``left``."""
    device = right.device
    sample = left[: max(BLOCK_ROWS)]
    speeds = {}
    for rows, cols in itertools.product(sorted({min(r, len(left)) for r in BLOCK_ROWS}), BLOCK_COLS):
        if cols is not None and cols >= len(right):
            continue
        blocked_matmul(sample[:rows], right, dtype, rows, cols)  # warm-up of this shape
        speeds[(rows, cols)] = len(sample) / timed(
            functools.partial(blocked_matmul, sample, right, dtype, rows, cols), device, 1
        )
    return max(speeds, key=speeds.get)


def run_naive(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, cap: bool) -> None:
    s = (left.to(right.device, dtype) @ right.T).float()
    if cap:
        s = torch.tanh(s / SOFTCAP) * SOFTCAP
    s.topk(K, dim=1)
    s.topk(K, dim=1, largest=False)
    torch.std_mean(s, dim=1)
    s.quantile(torch.tensor([0.5, 0.75], device=s.device), dim=1, interpolation="lower")
    p = s.softmax(dim=1)
    p.max(1)
    -(p * p.clamp_min(1e-30).log()).sum(1)


def worker(
    approach: str, dtype_name: str, n_a: int, n_b: int, budget: int, cap: bool, repeats: int, device: torch.device
) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    right = (torch.randn(n_b, D) / D**0.5).to(device, dtype)  # weights as stored; no conversion timed
    left = torch.randn(n_a, D)
    found: dict = {}
    if approach == "best":
        rows, cols = best_block(left, right, dtype)
        found = {"block": f"{rows} x {cols or n_b}"}
        run: Callable[[torch.Tensor], object] = functools.partial(
            blocked_matmul, right=right, dtype=dtype, rows=rows, cols=cols
        )
    elif approach == "matmul":
        tile, _ = engine._plan(n_a, n_b, budget, dtype == torch.bfloat16, device.type == "cpu")
        found = {"block": f"{tile} x {n_b}"}
        run = functools.partial(blocked_matmul, right=right, dtype=dtype, rows=tile, cols=None)
    elif approach == "engine":
        run = functools.partial(
            engine.row_stats,
            right=right,
            k=K,
            softcap=SOFTCAP if cap else None,
            compute_dtype=dtype,
            device=device,
            memory_budget_bytes=budget,
        )
    else:
        run = functools.partial(run_naive, right=right, dtype=dtype, cap=cap)
    run(left[:8])  # warm-up: library initialisation, kernel selection
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_kib("VmRSS") << 10
    seconds = timed(lambda: run(left), device, repeats)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_kib("VmHWM") << 10) - base
    return {"seconds": seconds, "peak_mib": peak / 2**20, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-features", type=int, default=1024)
    parser.add_argument("--full", action="store_true", help="all 16384 features of a Gemma Scope SAE")
    parser.add_argument("--vocab", type=int, default=N_B, help="vocabulary rows (default Gemma-2's 256000)")
    parser.add_argument("--budget-mib", type=int, default=1024)
    parser.add_argument("--no-softcap", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="best time of this many runs per approach")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=APPROACHES)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=2, metavar=("APPROACH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_a = 16384 if args.full else args.n_features
    budget, cap, device = args.budget_mib << 20, not args.no_softcap, torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(*args.worker, n_a, args.vocab, budget, cap, args.repeats, device)))
        return

    flop = 2 * n_a * args.vocab * D
    print(
        f"device={device} n_a={n_a} n_b={args.vocab} d={D} k={K} softcap={cap} budget={args.budget_mib} MiB "
        f"threads={torch.get_num_threads()} best of {args.repeats}"
    )
    print(f"{'dtype':5} {'approach':8} {'seconds':>8} {'GFLOP/s':>8} {'vs best':>8} {'peak MiB':>9}  block")
    rows = []
    for dtype_name in args.dtypes:
        results: dict[str, dict] = {}
        for approach in args.approaches:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                approach,
                dtype_name,
                "--n-features",
                str(n_a),
                "--vocab",
                str(args.vocab),
                "--budget-mib",
                str(args.budget_mib),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
                *["--no-softcap"] * (not cap),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{approach} {dtype_name} failed:\n{done.stderr[-3000:]}")
            out = done.stdout
            results[approach] = r = json.loads(out.strip().splitlines()[-1])
            ratio = results["best"]["seconds"] / r["seconds"] if "best" in results else float("nan")
            rows.append(
                {"dtype": dtype_name, "approach": approach, "gflops": flop / r["seconds"] / 1e9, "vs_best": ratio, **r}
            )
            print(
                f"{dtype_name:5} {approach:8} {r['seconds']:8.2f} {flop / r['seconds'] / 1e9:8.1f} {ratio:8.1%} "
                f"{r['peak_mib']:9.0f}  {r.get('block', '')}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
