"""The asset chain on one planted partition on a device and in a precision, compared table by table with the
same partition in float32 on the CPU (``benchmarks/gpu_check.sh``, step 3; ``--device cpu --dtype bfloat16``
measures what bf16 changes).

Run: .venv/bin/python benchmarks/device_chain.py --device cuda [--dtype float32] [--null-directions 512] [--out DIR]

Prints, per table, the rows compared, the largest difference of any float column relative to that column's
largest magnitude, and the agreement of the top-k token ids (same set per row); then the share of features
whose classes (``output_predicting``, ``semantic``) agree, and the wall seconds of each device's run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from core.store.storage import TableStore
from core.testbeds.planted import generate
from orchestration.cli import materialize_all
from orchestration.resources import ComputeResource, HubResource, StoreResource

RELEASE, KEY = "planted-gemma", "planted-gemma:layer_0/width_512/average_l0_32"
TABLES = ("output_lens_stats", "input_lens_stats", "circuit_stats", "head_writes", "feature_classes")
ID_COLUMNS = ("top_ids",)


def run_chain(cache: Path, data: Path, device: str, dtype: str, nulls: int) -> float:
    """Materialise ``KEY``'s chain and the report on ``device`` (``nulls`` lens null directions, a quarter as many
    circuit ones); wall seconds."""
    compute = ComputeResource(device=device, dtype=dtype, null_directions=nulls, circuit_null_directions=nulls // 4)
    resources = {
        "hub": HubResource(cache_dir=str(cache), offline=True),
        "store": StoreResource(data_dir=str(data)),
        "compute": compute,
    }
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("sae", [KEY])
    start = time.perf_counter()
    materialize_all(instance, [KEY], resources)
    return time.perf_counter() - start


def compare(got: pd.DataFrame, ref: pd.DataFrame) -> dict[str, float]:
    """Largest relative float difference and top-id set agreement of two versions of one table."""
    floats = [c for c in ref.columns if ref[c].dtype.kind == "f"]
    rel = max(
        (
            float(
                np.nanmax(np.abs(got[c].to_numpy() - ref[c].to_numpy())) / max(float(np.nanmax(np.abs(ref[c]))), 1e-30)
            )
            for c in floats
            if ref[c].notna().any()
        ),
        default=0.0,
    )
    ids = [c for c in ID_COLUMNS if c in ref]
    agree = float(np.mean([set(a) == set(b) for c in ids for a, b in zip(got[c], ref[c])])) if ids else float("nan")
    return {"rows": len(ref), "max_rel_diff": rel, "top_ids_agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--null-directions", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp())
    cache = out / "hf-cache"
    generate(RELEASE, cache, layers=[0])
    subject, reference = (args.device, args.dtype), ("cpu", "float32")
    seconds = {
        run: run_chain(cache, out / "-".join(run), *run, args.null_directions)
        for run in dict.fromkeys([subject, reference])
    }
    stores = {run: TableStore(out / "-".join(run)) for run in seconds}
    print(f"{'/'.join(subject)} against {'/'.join(reference)}")
    print(f"{'table':20} {'rows':>7} {'max rel diff':>13} {'top ids agree':>14}")
    for table in TABLES:
        got, ref = (stores[run].read(table, KEY) for run in (subject, reference))
        r = compare(got, ref)
        print(f"{table:20} {r['rows']:7d} {r['max_rel_diff']:13.2e} {r['top_ids_agree']:14.4f}")
    got, ref = (stores[run].read("feature_classes", KEY) for run in (subject, reference))
    same = {c: float((got[c] == ref[c]).mean()) for c in ("output_predicting", "semantic")}
    print("classes agree: " + ", ".join(f"{c} {v:.4f}" for c, v in same.items()))
    print("seconds: " + ", ".join(f"{'/'.join(run)} {s:.1f}" for run, s in seconds.items()))


if __name__ == "__main__":
    main()
