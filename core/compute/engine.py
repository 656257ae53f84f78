"""Exact per-row statistics of ``softcap(left @ right.T)`` without materialising it.

One engine serves every circuit (logit lens, embedding lens, feature-to-feature, ...):
for each row ``i`` of ``left`` (n_a, r) it summarises the score row

    x_i = softcap(left[i] @ right.T)            # (n_b,), right is (n_b, r)

over all ``n_b`` columns. The n_a x n_b matrix never exists in memory.

Tiling and memory
-----------------
``left`` is processed in tiles of ``tile`` rows. ``tile`` is the largest row count for which the torch
path's buffers fit (below), capped at ``MAX_TILE_ROWS``; both paths use it, so a budget that fits
one fits the other.

On CPU the compiled kernel (``core.compute.rowstats``) takes each tile's scores in column blocks: one matmul
per block of ``cols`` vocabulary rows writes a (tile x cols) block of ~``_BLOCK_BYTES`` into a reused
buffer, and the kernel summarises it while it is in cache — the same FLOPs as a cache-blocked matmul,
plus a first small matmul with the ``s`` sample columns (s / n_b of the FLOPs, 1.6 % at a 256000-token
vocabulary) that fixes each row's quantile brackets. What persists across blocks is O(k) per row plus
the values inside the brackets (~5 % of a row per quantile; the whole row at worst). Writing the full
tile x n_b block and reading it back (the earlier design) ran at 65 % of the machine's best matmul on
an AVX2 CPU; the blocked kernel at ~90 % (``benchmarks/engine_benchmark.py``).

On CUDA, or where no C++ compiler is available, each tile's full score block (tile x n_b, float32;
plus a bfloat16 copy of the same shape when ``compute_dtype=torch.bfloat16``) is produced by one
matmul into a reused buffer, then summarised with torch ops in cache-sized chunks of ``chunk`` rows
(one tile on GPU), whose temporaries (a float32 work block, three bool masks) are bounded by
``chunk x n_b x 7`` bytes:

    tile * n_b * (4 + 2*[bf16]) + chunk * n_b * 7  <=  memory_budget_bytes

so the peak working memory beyond the inputs, ``right``'s device copy and O(n_a * k) outputs is
bounded by the budget plus O(chunk * n_b) bytes of selection scratch (bracketed values, gathered
ids), and does not depend on n_a. Both paths give identical order statistics and moments equal to
float32 rounding (tests run both).

Statistics (exact: every row is summarised over all n_b columns; sums in float32, the compiled
path's across blocks of 64 in float64)
------------------------------------------------------------------------------------------
* ``top_ids/top_values``: the k largest values, descending; ``bottom_*`` the k
  smallest, ascending. Ties: among equal values the LOWER column id comes first,
  including at the k-th boundary (a row's selection is the first k of the stable
  order (value, column id)).
* ``mean``; ``std`` is the population standard deviation (correction = 0): two-pass on the torch
  path; the compiled path centres on the sample mean c, std = sqrt(E (x - c)^2 - (mean - c)^2).
* ``median``/``p75``: the order statistic at 0-based sorted index floor(q * (n_b - 1)),
  i.e. ``torch.quantile(x, q, interpolation="lower")`` (the median is the lower
  median, as ``torch.median``). Found by a sample-bracketed selection: a fixed random
  column sample brackets the target; values below/inside the bracket are counted and
  only the bracket is searched. A row whose bracket misses falls back to a selection
  over the whole row, so the result is exact either way.
* softmax p over the n_b columns, z = sum exp(x - max):
  ``softmax_max`` = 1 / z, ``softmax_entropy`` = log z - sum p * (x - max) (= lse - sum p x
  without the cancellation at large |x|), ``topk_mass`` = sum of p over the top k.

Values must be finite (no NaN / inf).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from core.compute import rowstats

MAX_TILE_ROWS = 512  # fp32/bf16 CPU matmul throughput is flat beyond this
_BLOCK_BYTES = 4 << 20  # compiled path: a tile's column block, written by the matmul and read back from cache
_CHUNK_BYTES = 8 << 20  # CPU stats chunk: x, work and masks (~22 MiB at 8 MiB) stay in a 32 MiB last-level cache
_CHUNK_TEMP_BYTES = 7  # per chunk element: work f32 + 3 bool masks (the softcap acts in place)
_SAMPLE = 4096  # bracket sample size for the quantile selection: at most this, at most n_b / 16 (the
# sample's selection must stay small next to the row's pass), at least 256
_MARGIN_SD = 4.0  # bracket half-width in binomial standard deviations of the sample rank: a row misses
# (and is recomputed whole, ~0.2 s at Gemma-2-2B shapes) with probability ~6e-5 per quantile (3 sd: 3e-3)
_QUANTILES = (0.5, 0.75)


@dataclass(frozen=True)
class RowStats:
    """Per-row statistics; CPU tensors, float32 values, int64 ids, one row per row of ``left``."""

    top_ids: Tensor  # (n_a, k), values descending
    top_values: Tensor
    bottom_ids: Tensor  # (n_a, k), values ascending
    bottom_values: Tensor
    mean: Tensor  # (n_a,)
    std: Tensor
    median: Tensor
    p75: Tensor
    softmax_max: Tensor
    softmax_entropy: Tensor
    topk_mass: Tensor

    def shifted(self, offset: Tensor) -> RowStats:
        """The statistics of each row r plus ``offset[r]``: values, mean and quantiles move by it; ids, std and the
        softmax statistics do not (a softmax is invariant to a constant added to its row)."""
        col = offset.to(torch.float32)[:, None]
        return replace(
            self,
            top_values=self.top_values + col,
            bottom_values=self.bottom_values + col,
            mean=self.mean + col[:, 0],
            median=self.median + col[:, 0],
            p75=self.p75 + col[:, 0],
        )


def row_stats(
    left: Tensor,
    right: Tensor,
    *,
    k: int = 10,
    softcap: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    memory_budget_bytes: int = 1 << 30,
    progress: Callable[[int, int], None] | None = None,
) -> RowStats:
    """Statistics of each row of ``softcap(left @ right.T)`` over its n_b columns.

    ``left`` is (n_a, r), ``right`` is (n_b, r). The matmul runs in ``compute_dtype``
    (float32 or bfloat16); its result is upcast to float32 before the softcap
    (``cap * tanh(x / cap)``, Gemma's logit and attention capping; none when None) and all
    statistics. See the module docstring for the tiling, the memory bound, the exact
    definitions and the tie rule.
    ``progress(done_rows, n_a)`` is called after each tile.
    """
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(f"need left (n_a, r) and right (n_b, r); got {tuple(left.shape)}, {tuple(right.shape)}")
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
    n_a, n_b = left.shape[0], right.shape[0]
    if not 1 <= k <= n_b:
        raise ValueError(f"k must be in [1, n_b={n_b}], got {k}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = compute_dtype == torch.bfloat16
    tile, chunk = _plan(n_a, n_b, memory_budget_bytes, bf16, dev.type == "cpu")

    right_dev = right.to(dev, compute_dtype).contiguous()
    sample_size = min(_SAMPLE, max(256, n_b // 16), n_b)
    sample = torch.randperm(n_b, generator=torch.Generator().manual_seed(0))[:sample_size].sort().values.to(dev)
    brackets = _brackets(n_b, sample_size)
    lib = rowstats.native() if dev.type == "cpu" else None
    if lib is not None:  # compiled path: column blocks of each tile, summarised while in cache
        cols = _block_columns(tile, n_b)
        raw = torch.empty(tile * cols, device=dev, dtype=compute_dtype)
        right_sample = right_dev.index_select(0, sample)
    else:  # torch path: whole-row tiles, a float32 copy of bf16 scores, scratch for the chunks
        raw = torch.empty(tile, n_b, device=dev, dtype=compute_dtype)
        scores = torch.empty(tile, n_b, device=dev) if bf16 else raw
        work = torch.empty(chunk, n_b, device=dev)
        masks = torch.empty(3, chunk, n_b, device=dev, dtype=torch.bool)

    parts: list[dict[str, Tensor]] = []
    for start in range(0, n_a, tile):
        rows = min(tile, n_a - start)
        block = left[start : start + rows].to(dev, compute_dtype)
        if lib is not None:
            blocks = _column_blocks(block, right_dev, raw, cols)
            parts.append(
                rowstats.compute(
                    lib,
                    block @ right_sample.T,
                    blocks,
                    n_b,
                    k,
                    softcap,
                    brackets,
                    functools.partial(_whole_rows, block, right_dev),
                )
            )
        else:
            torch.matmul(block, right_dev.T, out=raw[:rows])
            if bf16:
                scores[:rows].copy_(raw[:rows])
            for c0 in range(0, rows, chunk):
                x = scores[c0 : min(rows, c0 + chunk)]
                if softcap is not None:
                    x.div_(softcap).tanh_().mul_(softcap)
                m = x.shape[0]
                parts.append(_chunk_stats(x, work[:m], masks[:, :m], sample, brackets, k))
        if progress is not None:
            progress(start + rows, n_a)

    if not parts:  # n_a == 0
        empty = torch.empty(0)
        ids = torch.empty(0, k, dtype=torch.int64)
        return RowStats(ids, torch.empty(0, k), ids, torch.empty(0, k), *(empty,) * 7)
    return RowStats(**{name: torch.cat([p[name] for p in parts]).cpu() for name in parts[0]})


def _block_columns(tile: int, n_b: int) -> int:
    """Columns per block of the compiled path: a (tile x cols) float32 block of ~_BLOCK_BYTES, a
    multiple of 64 (the kernel's block of values), at most n_b."""
    return min(n_b, max(64, _BLOCK_BYTES // (4 * tile) // 64 * 64))


def _column_blocks(block: Tensor, right: Tensor, buffer: Tensor, cols: int) -> Iterator[tuple[int, Tensor]]:
    """(first column, block @ right[c0 : c0 + cols].T) for consecutive column blocks, each written into
    ``buffer`` (reused: a block is spent before the next is made)."""
    for c0 in range(0, len(right), cols):
        part = right[c0 : c0 + cols]
        out = buffer[: len(block) * len(part)].view(len(block), len(part))
        torch.matmul(block, part.T, out=out)
        yield c0, out


def _whole_rows(block: Tensor, right: Tensor, rows: Tensor) -> Tensor:
    return block[rows] @ right.T


def _plan(n_a: int, n_b: int, budget: int, bf16: bool, on_cpu: bool) -> tuple[int, int]:
    """(tile, chunk) row counts so that the working buffers fit in ``budget`` bytes."""
    block_row = n_b * (4 + 2 * bf16)  # score buffer (+ bf16 matmul output) per tile row
    temp_row = n_b * _CHUNK_TEMP_BYTES
    chunk_cap = max(1, _CHUNK_BYTES // (4 * n_b)) if on_cpu else budget
    tile = chunk = budget // (block_row + temp_row)  # stats on whole tiles
    if tile > chunk_cap:  # stats on cache-sized chunks leave more of the budget to the tile
        chunk = chunk_cap
        tile = (budget - chunk * temp_row) // block_row
    if tile < 1:
        raise ValueError(f"memory_budget_bytes={budget} cannot hold one row of {n_b} scores")
    tile = min(tile, MAX_TILE_ROWS, max(n_a, 1))
    return tile, min(chunk, tile)


def _chunk_stats(
    x: Tensor, work: Tensor, masks: Tensor, sample: Tensor, brackets: list[tuple[int, int, int]], k: int
) -> dict[str, Tensor]:
    """All statistics of the rows of ``x`` (m, n), float32, with torch ops (CUDA, or no compiler);
    ``work``/``masks`` are scratch and ``x`` is spent."""
    n = x.shape[1]
    top_values, top_ids = _extreme(x, k, largest=True)
    bottom_values, bottom_ids = _extreme(x, k, largest=False)
    median, p75 = _quantiles(x, sample, brackets, masks)

    mean = x.sum(1) / n
    torch.sub(x, mean[:, None], out=work)
    std = torch.linalg.vector_norm(work, dim=1).div_(math.sqrt(n))

    p = torch.softmax(x, dim=1, out=work)  # torch's fused row kernel: one cache-resident pass per row
    p_max = p.gather(1, top_ids[:, :1]).squeeze(1)  # = 1 / z, z = sum exp(x - max)
    topk_mass = p.gather(1, top_ids).sum(1)
    # entropy = lse - sum p x = log z - sum p (x - max): small terms, no cancellation at large |x|
    entropy = p.mul_(x.sub_(top_values[:, :1])).sum(1).neg_().sub_(p_max.log())  # x is spent
    return {
        "top_ids": top_ids,
        "top_values": top_values,
        "bottom_ids": bottom_ids,
        "bottom_values": bottom_values,
        "mean": mean,
        "std": std,
        "median": median,
        "p75": p75,
        "softmax_max": p_max,
        "softmax_entropy": entropy,
        "topk_mass": topk_mass,
    }


def _extreme(x: Tensor, k: int, *, largest: bool) -> tuple[Tensor, Tensor]:
    """k largest (smallest) values per row and their ids; equal values: lower id first."""
    n = x.shape[1]
    values, ids = torch.topk(x, min(k + 1, n), dim=1, largest=largest, sorted=True)
    if k < n:
        # Only if the (k+1)-th value equals the k-th can topk have left out an equal
        # value with a lower id; redo those rows exactly (rare for real-valued scores).
        for r in (values[:, k - 1] == values[:, k]).nonzero().flatten().tolist():
            edge = values[r, k - 1]
            beyond = (x[r] > edge) if largest else (x[r] < edge)
            keep = torch.cat([beyond.nonzero().flatten(), (x[r] == edge).nonzero().flatten()])[:k]
            ids[r, :k] = keep
            values[r, :k] = x[r, keep]
    values, ids = values[:, :k], ids[:, :k]
    ids, order = ids.sort(dim=1)  # then a stable sort by value keeps ascending ids among ties
    values, order2 = values.gather(1, order).sort(dim=1, descending=largest, stable=True)
    return values, ids.gather(1, order2)


def _brackets(n: int, s: int) -> list[tuple[int, int, int]]:
    """Per q in _QUANTILES: the target sorted index t = floor(q * (n - 1)) and the 0-based ranks, in a
    sample of s columns, of the bracket's ends: the target's expected sample rank +- _MARGIN_SD
    binomial standard deviations (+1). A rank outside [0, s) means an open end (-inf / +inf)."""
    brackets = []
    for q in _QUANTILES:
        target = math.floor(q * (n - 1))
        centre, margin = (target + 0.5) * s / n, _MARGIN_SD * math.sqrt(s * q * (1 - q)) + 1
        brackets.append((target, math.floor(centre - margin), math.ceil(centre + margin)))
    return brackets


def _quantiles(x: Tensor, sample: Tensor, brackets: list[tuple[int, int, int]], masks: Tensor) -> list[Tensor]:
    """Per row and bracket (see _brackets), the value at the target sorted index, exact (torch path).

    The sample's order statistics give each bracket [lo_q, hi_q]. One pass per bracket counts the
    values below lo_q (c_q) and adds the bracket to a band mask; the band's values are gathered once
    for all quantiles. If c_q <= t_q < c_q + |values in [lo_q, hi_q]|, the target is the value at
    sorted index t_q - c_q among the row's values in the bracket; a row whose bracket misses its
    target falls back to kthvalue over the whole row.
    """
    m, n = x.shape
    xs = x.index_select(1, sample)
    s = xs.shape[1]
    below, inside, band = masks
    band.zero_()
    edges = []
    for target, lo_rank, hi_rank in brackets:
        lo = xs.kthvalue(lo_rank + 1, 1, keepdim=True).values if lo_rank >= 0 else x.new_full((m, 1), -math.inf)
        hi = xs.kthvalue(hi_rank + 1, 1, keepdim=True).values if hi_rank < s else x.new_full((m, 1), math.inf)
        torch.lt(x, lo, out=below)
        n_below = below.view(torch.uint8).sum(1, dtype=torch.int32)
        torch.le(x, hi, out=inside).logical_xor_(below)  # lo <= x <= hi (below implies x <= hi)
        band.logical_or_(inside)
        edges.append((target, lo.squeeze(1), hi.squeeze(1), n_below))

    flat = band.view(-1).nonzero().squeeze(1)
    values = x.reshape(-1).take(flat)  # row-major: each row's band values are contiguous
    rows = flat.div_(n, rounding_mode="floor")
    results = []
    for target, lo, hi, n_below in edges:
        mine = ((values >= lo[rows]) & (values <= hi[rows])).nonzero().squeeze(1)
        counts = torch.bincount(rows[mine], minlength=m)
        starts = [0, *counts.cumsum(0).tolist()]
        rank = target - n_below  # the target's sorted index among the row's values in [lo, hi]
        hits = ((rank >= 0) & (rank < counts)).tolist()
        segments = values[mine]
        results.append(
            torch.stack(
                [
                    segments[starts[i] : starts[i + 1]].kthvalue(r + 1).values
                    if hit
                    else x[i].kthvalue(target + 1).values
                    for i, (r, hit) in enumerate(zip(rank.tolist(), hits))
                ]
            )
        )
    return results
