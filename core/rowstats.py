"""The engine's per-row statistics on CPU, compiled: every statistic of a score block in one kernel.

Done with torch ops, the statistics take ~25 passes over each score block (softcap, compare, count,
mask, gather, kthvalue, exp, sums) and cost more than the matmul they summarise. ``core/rowstats.cpp``
takes one row at a time while it is in cache: the softcap; the k largest / smallest values in sorted
insertion lists, gated by each 64-value block's range; each quantile's sample bracket counted and
gathered in the same loop (16 lanes at a time with AVX-512, else a portable branch-free loop), then a
histogram and ``std::nth_element`` inside the bracket; then mean, std and the softmax statistics in one
more pass (float within a block, double across blocks). Order statistics are identical to the torch
path (same definitions, tie rule and brackets); the moments agree to float32 rounding.

Built on first use with the system C++ compiler (``$CXX``, else ``c++``) and OpenMP into
``$WEIGHTLENS_NATIVE_DIR`` (default ``<tmp>/weightlens-native``), named by a hash of the source, the
flags and the machine's CPU so a shared directory never serves a library built for another CPU;
written to a temporary name and renamed, so concurrent first uses are safe. Where no compiler works,
:func:`native` returns None (and logs why once) and the engine uses its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from core.atomic import atomic_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rowstats.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MOMENTS = ("mean", "std", "softmax_max", "softmax_entropy", "topk_mass")  # after the quantiles, in order
_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def build(directory: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``rowstats.cpp`` (once per source, flags and CPU) and return the library's path.
    ``extra_flags`` e.g. ``("-mno-avx512f",)`` builds the portable loops the tests also check."""
    compiler = os.environ.get("CXX", "c++")
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    directory = directory or Path(os.environ.get("WEIGHTLENS_NATIVE_DIR") or Path(tempfile.gettempdir()) / "weightlens-native")
    library = directory / f"rowstats-{key}.so"
    if not library.exists():
        with atomic_path(library) as partial:
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, text=True)
    return library


def load(library: Path) -> ctypes.CDLL:
    """A built library with its function's signature declared."""
    lib = ctypes.CDLL(str(library))
    lib.weightlens_row_stats.restype = ctypes.c_int
    lib.weightlens_row_stats.argtypes = [
        _ptr, _i32, _i64, _i64, _f32, _i32, _ptr, _i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i32,
    ]
    return lib


@functools.cache
def native() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built (the engine then uses torch)."""
    try:
        return load(build())
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("native row statistics unavailable, using the torch path: %s", detail)
        return None


def compute(
    lib: ctypes.CDLL, x: Tensor, k: int, softcap: float | None, sample: Tensor, brackets: list[tuple[int, int, int]]
) -> dict[str, Tensor]:
    """Every statistic of the rows of ``x`` (a float32 or bfloat16 CPU matrix), softcapped first when
    ``softcap`` is set, as the engine's per-chunk dict. ``sample`` holds sorted int64 column ids,
    ``brackets`` per quantile (target index, lower and upper sample rank) as in ``core.engine``."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"need a float32 or bfloat16 CPU matrix, got {x.dtype} on {x.device}")
    x = x.contiguous()
    m, n = x.shape
    targets, lo_ranks, hi_ranks = (torch.tensor(column, dtype=torch.int64) for column in zip(*brackets))
    top_values, bottom_values = torch.empty(m, k), torch.empty(m, k)
    top_ids, bottom_ids = torch.empty(m, k, dtype=torch.int64), torch.empty(m, k, dtype=torch.int64)
    stats = torch.empty(m, len(brackets) + len(MOMENTS))
    status = lib.weightlens_row_stats(
        x.data_ptr(), x.dtype == torch.bfloat16, m, n, softcap or 0.0, k, sample.data_ptr(), len(sample), len(brackets),
        targets.data_ptr(), lo_ranks.data_ptr(), hi_ranks.data_ptr(),
        top_values.data_ptr(), top_ids.data_ptr(), bottom_values.data_ptr(), bottom_ids.data_ptr(),
        stats.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"native row statistics take 2 quantiles (median, P75), got {len(brackets)}")
    median, p75, *moments = stats.T.contiguous()
    return {
        "top_ids": top_ids, "top_values": top_values, "bottom_ids": bottom_ids, "bottom_values": bottom_values,
        "median": median, "p75": p75, **dict(zip(MOMENTS, moments)),
    }
