// Per-row order statistics of a float32 matrix in one cache-resident pass per row: the k largest and k
// smallest values (ties: lower column id first) and exact quantiles by sample bracketing. Built and
// called by core/selection.py (ctypes); the definitions are in core/engine.py's module docstring.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Insert (v, j) into a list kept in the stable order (value by `before`, id ascending); ids arrive in
// ascending order, so an equal value goes after the ones already there.
template <class Before>
inline void insert(float* vals, int64_t* ids, int32_t& filled, int32_t k, float v, int64_t j, Before before) {
    if (filled == k && !before(v, vals[k - 1])) return;
    int32_t p = filled < k ? filled++ : k - 1;
    while (p > 0 && before(v, vals[p - 1])) {
        vals[p] = vals[p - 1];
        ids[p] = ids[p - 1];
        --p;
    }
    vals[p] = v;
    ids[p] = j;
}

// The value at sorted index `rank` of b[0, len), all of them in [lo, hi]: a histogram of 256 equal
// bins over [lo, hi] (the bin of a value is monotone in the value) finds the target's bin, whose few
// values are then moved to the front and selected. Reorders b.
float select_in_bracket(float* b, int64_t len, int64_t rank, float lo, float hi) {
    constexpr int bins = 256;
    const float scale = bins / (hi - lo);
    if (len < 2 * bins || !std::isfinite(scale) || scale <= 0) {
        std::nth_element(b, b + rank, b + len);
        return b[rank];
    }
    const auto bin = [&](float v) { return std::min(bins - 1, static_cast<int>((v - lo) * scale)); };
    int64_t counts[bins] = {};
    for (int64_t j = 0; j < len; ++j) ++counts[bin(b[j])];
    int target = 0;
    for (; rank >= counts[target]; ++target) rank -= counts[target];
    int64_t kept = 0;
    for (int64_t j = 0; j < len; ++j) {
        b[kept] = b[j];
        kept += bin(b[j]) == target;
    }
    std::nth_element(b, b + rank, b + kept);
    return b[rank];
}

// The smallest and largest value of row[from, to) into mn / mx (which start at +inf / -inf).
inline void block_range(const float* row, int64_t from, int64_t to, float& mn, float& mx) {
    int64_t j = from;
#if defined(__AVX512F__)
    __m512 lo_v = _mm512_set1_ps(INFINITY), hi_v = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= to; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        lo_v = _mm512_min_ps(lo_v, v);
        hi_v = _mm512_max_ps(hi_v, v);
    }
    mn = _mm512_reduce_min_ps(lo_v);
    mx = _mm512_reduce_max_ps(hi_v);
#endif
    for (; j < to; ++j) {
        mn = std::min(mn, row[j]);
        mx = std::max(mx, row[j]);
    }
}

// Over row[from, to): returns how many values are below lo, and appends those in [lo, hi] at out
// (which advances; out needs 16 floats of slack). AVX-512 compresses 16 lanes at a time.
inline int64_t count_and_gather(const float* row, int64_t from, int64_t to, float lo, float hi, float*& out) {
    int64_t below = 0, j = from;
#if defined(__AVX512F__)
    const __m512 lo_v = _mm512_set1_ps(lo), hi_v = _mm512_set1_ps(hi);
    for (; j + 16 <= to; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        const __mmask16 under = _mm512_cmp_ps_mask(v, lo_v, _CMP_LT_OQ);
        const __mmask16 inside = _mm512_cmp_ps_mask(v, lo_v, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, hi_v, _CMP_LE_OQ);
        below += __builtin_popcount(under);
        _mm512_storeu_ps(out, _mm512_maskz_compress_ps(inside, v));
        out += __builtin_popcount(inside);
    }
#endif
    for (; j < to; ++j) {
        const float v = row[j];
        below += v < lo;
        *out = v;  // kept only if v is inside the bracket (branch-free)
        out += (v >= lo) & (v <= hi);
    }
    return below;
}

// Inserts every value of row[from, to) that beats `edge` into the list (see insert); `edge` becomes
// the list's last value once it holds k.
template <class Before>
inline void keep_extremes(const float* row, int64_t from, int64_t to, int32_t k, float* vals, int64_t* ids,
                          int32_t& filled, float& edge, Before before) {
    for (int64_t j = from; j < to; ++j) {
        if (!before(row[j], edge)) continue;
        insert(vals, ids, filled, k, row[j], j, before);
        if (filled == k) edge = vals[k - 1];
    }
}

// The sample's order statistics at the given ranks (-inf below rank 0, +inf from rank s on), each
// nth_element working right of the previous one. Reorders xs.
template <int E>
void sample_ends(std::vector<float>& xs, const int64_t (&ranks)[E], float (&ends)[E]) {
    int order[E];
    for (int e = 0; e < E; ++e) order[e] = e;
    std::sort(order, order + E, [&](int a, int b) { return ranks[a] < ranks[b]; });
    const int64_t s = static_cast<int64_t>(xs.size());
    int64_t done = 0;
    for (int e : order) {
        const int64_t r = ranks[e];
        if (r < 0 || r >= s) {
            ends[e] = r < 0 ? -INFINITY : INFINITY;
            continue;
        }
        std::nth_element(xs.begin() + done, xs.begin() + r, xs.end());
        ends[e] = xs[r];
        done = r;
    }
}

// One row: the k largest and smallest values, and per quantile q < NQ the value at sorted index
// targets[q], found inside the bracket [lo, hi] given by the sample's order statistics. The row is
// read in blocks of 64: a block's range decides whether it can touch the top / bottom lists.
template <int NQ>
void select_row(const float* row, int64_t n, int32_t k, const int64_t* sample, const int64_t* targets,
                const int64_t* lo_ranks, const int64_t* hi_ranks, float* tv, int64_t* ti, float* bv, int64_t* bi,
                float* quantiles, std::vector<float>& xs, std::vector<float>& band, std::vector<float>& whole) {
    for (size_t j = 0; j < xs.size(); ++j) xs[j] = row[sample[j]];
    int64_t ranks[2 * NQ];
    float ends[2 * NQ];
    for (int q = 0; q < NQ; ++q) ranks[2 * q] = lo_ranks[q], ranks[2 * q + 1] = hi_ranks[q];
    sample_ends(xs, ranks, ends);
    float* start[NQ];
    float* out[NQ];
    int64_t below[NQ] = {};
    for (int q = 0; q < NQ; ++q) start[q] = out[q] = band.data() + q * (n + 16);

    int32_t top_filled = 0, bottom_filled = 0;
    float top_edge = -INFINITY, bottom_edge = INFINITY;  // a value must beat these to enter a list
    const auto larger = [](float a, float b) { return a > b; };
    const auto smaller = [](float a, float b) { return a < b; };
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
        const int64_t j1 = std::min(n, j0 + 64);
        float mn = INFINITY, mx = -INFINITY;
        block_range(row, j0, j1, mn, mx);
        if (mx > top_edge) keep_extremes(row, j0, j1, k, tv, ti, top_filled, top_edge, larger);
        if (mn < bottom_edge) keep_extremes(row, j0, j1, k, bv, bi, bottom_filled, bottom_edge, smaller);
        for (int q = 0; q < NQ; ++q) below[q] += count_and_gather(row, j0, j1, ends[2 * q], ends[2 * q + 1], out[q]);
    }
    for (int q = 0; q < NQ; ++q) {
        const int64_t rank = targets[q] - below[q];  // the target's index among the bracketed values
        if (rank >= 0 && rank < out[q] - start[q]) {
            quantiles[q] = select_in_bracket(start[q], out[q] - start[q], rank, ends[2 * q], ends[2 * q + 1]);
        } else {  // the sample's bracket missed: select over the whole row
            whole.assign(row, row + n);
            std::nth_element(whole.begin(), whole.begin() + targets[q], whole.end());
            quantiles[q] = whole[targets[q]];
        }
    }
}

}  // namespace

extern "C" int weightlens_select(
    const float* x, int64_t m, int64_t n, int32_t k,
    const int64_t* sample, int64_t s,
    int32_t n_q, const int64_t* targets, const int64_t* lo_ranks, const int64_t* hi_ranks,
    float* top_values, int64_t* top_ids, float* bottom_values, int64_t* bottom_ids,
    float* quantiles, int32_t threads) {
    if (n_q < 1 || n_q > 2) return 1;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> xs(s), band(static_cast<size_t>(n_q) * (n + 16)), whole;  // per thread
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            const auto row = [&](auto nq) {
                select_row<decltype(nq)::value>(x + i * n, n, k, sample, targets, lo_ranks, hi_ranks,
                                                top_values + i * k, top_ids + i * k, bottom_values + i * k,
                                                bottom_ids + i * k, quantiles + i * n_q, xs, band, whole);
            };
            if (n_q == 1) row(std::integral_constant<int, 1>{});
            else row(std::integral_constant<int, 2>{});
        }
    }
    return 0;
}
