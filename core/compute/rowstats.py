"""The engine's per-row statistics on CPU, compiled: every statistic of a score tile, streamed.

Done with torch ops, the statistics take ~25 passes over each score block (softcap, compare, count,
mask, gather, kthvalue, exp, sums) and cost more than the matmul they summarise; done on whole rows
(256000 scores, out of cache), they cost a third of it. ``core/compute/rowstats.cpp`` takes each tile's scores
in column blocks that the engine's matmul has just written, while they are in cache: the softcap; the
k largest / smallest values in sorted insertion lists, gated by each 64-value block's range; each
quantile's bracket (fixed beforehand from the row's scores at a random column sample) counted and
gathered (16 lanes at a time with AVX-512, else a portable branch-free loop), then a histogram and
``std::nth_element`` inside the bracket at the end; sums for the mean and the std (centred on the
sample mean) and the softmax sums against a running peak (float within a 64-value block, double
across blocks). A row whose bracket misses its target (rare) is recomputed whole and selected. Order
statistics are identical to the torch path (same definitions, tie rule and brackets); the moments
agree to float32 rounding.

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
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from core.store.atomic import atomic_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rowstats.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MOMENTS = ("mean", "std", "softmax_max", "softmax_entropy", "topk_mass")  # after the quantiles, in order
_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


def _cpu_signature() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))
        )
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def build(directory: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``rowstats.cpp`` (once per source, flags and CPU) and return the library's path.
    ``extra_flags`` e.g. ``("-march=x86-64",)`` builds for the baseline x86-64 CPU (SSE2 lanes, no
    AVX2 / FMA / AVX-512), the portable build the tests also check."""
    compiler = os.environ.get("CXX", "c++")
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    directory = directory or Path(
        os.environ.get("WEIGHTLENS_NATIVE_DIR") or Path(tempfile.gettempdir()) / "weightlens-native"
    )
    library = directory / f"rowstats-{key}.so"
    if not library.exists():
        with atomic_path(library) as partial:
            subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", str(partial)], check=True, capture_output=True, text=True
            )
    return library


def load(library: Path) -> ctypes.CDLL:
    """A built library with its functions' signatures declared."""
    lib = ctypes.CDLL(str(library))
    signatures = {
        "weightlens_stream_new": (_ptr, [_i64, _i64, _i32, _f32, _i32, _ptr, _ptr]),
        "weightlens_stream_free": (None, [_ptr]),
        "weightlens_stream_sample": (None, [_ptr, _ptr, _i32, _i64, _i32]),
        "weightlens_stream_block": (None, [_ptr, _ptr, _i32, _i64, _i64, _i32]),
        "weightlens_stream_finish": (None, [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i32]),
        "weightlens_select": (None, [_ptr, _i32, _i64, _i64, _f32, _i32, _ptr, _ptr, _i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
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
    lib: ctypes.CDLL,
    sample_scores: Tensor,
    blocks: Iterable[tuple[int, Tensor]],
    n: int,
    k: int,
    softcap: float | None,
    brackets: list[tuple[int, int, int]],
    whole_rows: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """Every statistic of m score rows of length ``n``, softcapped first when ``softcap`` is set, as the
    engine's per-tile dict, from the rows' scores at the sample columns (``sample_scores``, (m, s)) and
    then ``blocks``: (first column, (m, cols) scores) covering columns 0..n-1 once, in order. All scores
    are float32 or bfloat16 CPU matrices, before the softcap. ``brackets`` per quantile (target index,
    lower and upper sample rank) as in ``core.compute.engine``. ``whole_rows(rows)`` gives those rows' n scores,
    asked only for rows whose quantile bracket missed (rare: the sample rank's tails)."""
    m = len(sample_scores)
    targets, lo_ranks, hi_ranks = (torch.tensor(column, dtype=torch.int64) for column in zip(*brackets))
    threads = torch.get_num_threads()
    handle = lib.weightlens_stream_new(m, n, k, softcap or 0.0, len(brackets), lo_ranks.data_ptr(), hi_ranks.data_ptr())
    if not handle:
        raise ValueError(f"native row statistics take 2 quantiles (median, P75), got {len(brackets)}")
    top_values, bottom_values = torch.empty(m, k), torch.empty(m, k)
    top_ids, bottom_ids = torch.empty(m, k, dtype=torch.int64), torch.empty(m, k, dtype=torch.int64)
    stats = torch.empty(m, len(brackets) + len(MOMENTS))
    missed = torch.zeros(m, len(brackets), dtype=torch.bool)
    try:
        x = _scores(sample_scores)
        lib.weightlens_stream_sample(handle, x.data_ptr(), x.dtype == torch.bfloat16, x.shape[1], threads)
        for col0, block in blocks:
            x = _scores(block)
            lib.weightlens_stream_block(handle, x.data_ptr(), x.dtype == torch.bfloat16, x.shape[1], col0, threads)
        lib.weightlens_stream_finish(
            handle,
            targets.data_ptr(),
            top_values.data_ptr(),
            top_ids.data_ptr(),
            bottom_values.data_ptr(),
            bottom_ids.data_ptr(),
            stats.data_ptr(),
            missed.data_ptr(),
            threads,
        )
    finally:
        lib.weightlens_stream_free(handle)
    rows = missed.any(1).nonzero().flatten()
    if len(rows):
        x = _scores(whole_rows(rows))
        chosen = torch.empty(len(rows), len(brackets))
        lib.weightlens_select(
            x.data_ptr(),
            x.dtype == torch.bfloat16,
            len(rows),
            n,
            softcap or 0.0,
            len(brackets),
            targets.data_ptr(),
            chosen.data_ptr(),
            threads,
        )
        stats[rows, : len(brackets)] = torch.where(missed[rows], chosen, stats[rows, : len(brackets)])
    median, p75, *moments = stats.T.contiguous()
    return {
        "top_ids": top_ids,
        "top_values": top_values,
        "bottom_ids": bottom_ids,
        "bottom_values": bottom_values,
        "median": median,
        "p75": p75,
        **dict(zip(MOMENTS, moments)),
    }


def _scores(x: Tensor) -> Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or x.ndim != 2:
        raise ValueError(f"need a float32 or bfloat16 CPU matrix, got {x.dtype} {tuple(x.shape)} on {x.device}")
    return x.contiguous()
