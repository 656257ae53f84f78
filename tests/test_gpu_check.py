"""``benchmarks/gpu_check.sh --cpu``: the GPU check's dry mode, so the script a GPU session runs cannot rot."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_runs_every_step(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = dict(line.split()[:2] for line in (tmp_path / "steps.txt").read_text().splitlines())
    assert steps == {"engine": "ok", "fidelity": "ok", "chain": "ok"}
    summary = done.stdout[done.stdout.index("== summary") :]
    for approach in ("best", "matmul", "engine", "naive"):  # fp32 and bf16 rows of the benchmark table
        assert f"fp32  {approach}" in summary and f"bf16  {approach}" in summary
    assert "classes agree: output_predicting 1.0000, semantic 1.0000" in summary  # cpu against itself
