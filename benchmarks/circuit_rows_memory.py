"""Peak memory of streaming ``circuit_stats`` rows against the number of circuits (issue: ``circuit_layers="all"``).

Run: .venv/bin/python benchmarks/circuit_rows_memory.py [--circuits 24 96 312] [--dir DIR]

``circuit_tables`` hands each circuit's rows (every sample: 2 x 16384 features + 256 null directions of a 16k
Gemma Scope SAE) to ``TableStore.appender`` as soon as they exist (``core.pipeline.circuit_tables``). This
writes that many rows per circuit, with the real columns and list lengths (``core.lens.frames.circuit_frame``:
summary statistics, top ids and values as lists, k = 10), through the same appender, once per circuit count in
its own process, and prints each process's peak RSS (``VmHWM``) beside the rows stored: flat memory means the
rows never accumulate. 24 circuits is Gemma-2-2B's "adjacent" set of one SAE, 312 its "all" set at layer 12
(13 writer layers x 8 heads + 13 reader layers x 8 heads x 2 QK kinds). The engine's own working memory per
circuit does not depend on the count either (one circuit at a time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import peak_rss  # noqa: E402

ROWS = 2 * 16384 + 256  # features + control + circuit null directions of a 16k SAE
K = 10
STATS = ("mean", "std", "median", "p75", "top_mean", "softmax_max", "softmax_entropy", "topk_mass")


def circuit_rows(i: int, rng: np.random.Generator) -> pd.DataFrame:
    """One circuit's rows with ``circuit_stats``' columns (random values of the stored dtypes)."""
    frame = pd.DataFrame(
        {
            "release": "gemma-scope-2b-pt-res",
            "sae_id": "layer_12/width_16k/average_l0_82",
            "layer": 12,
            "sample": np.repeat(["feature", "control", "null"], [16384, 16384, 256]),
            "feature": np.concatenate([np.arange(16384), np.arange(16384), np.arange(256)]),
            "phase": "decoder_unembedding",
            "kind": "qk_feature_query",
            "attn_layer": 13 + i % 13,
            "head": i % 8,
            "kv_head": (i % 8) // 2,
            **{name: rng.normal(size=ROWS) for name in STATS},
        }
    )
    frame["top_ids"] = rng.integers(0, 256000, (ROWS, K)).tolist()
    frame["top_values"] = rng.normal(size=(ROWS, K)).astype(np.float32).tolist()
    return frame


def stream(n: int, folder: Path) -> None:
    """Append ``n`` circuits' rows in this process; print rows stored, seconds and peak RSS."""
    from core.store.storage import TableStore

    tables, rng = TableStore(folder), np.random.default_rng(0)
    start = time.perf_counter()
    with tables.appender("circuit_stats", "bench:sae") as append:
        for i in range(n):
            append(circuit_rows(i, rng))
    rows = len(pd.read_parquet(tables.file("circuit_stats", "bench:sae"), columns=["feature"]))
    print(f"{n:>9} {rows:>11} {time.perf_counter() - start:>9.1f} {peak_rss() / (1 << 20):>10.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--circuits", type=int, nargs="+", default=[24, 96, 312])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one count in this process
    args = parser.parse_args()
    if args.one is not None:
        stream(args.one, args.dir)
        return
    print(f"{ROWS} rows per circuit; each count in its own process")
    print(f"{'circuits':>9} {'rows':>11} {'seconds':>9} {'peak MiB':>10}", flush=True)
    for n in args.circuits:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            me = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--dir", folder]
            subprocess.run(me, check=True)


if __name__ == "__main__":
    main()
