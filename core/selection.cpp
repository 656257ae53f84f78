// Per-row order statistics of a float32 matrix in one cache-resident pass per row: the k largest and k
// smallest values (ties: lower column id first) and exact quantiles by sample bracketing. Built and
// called by core/selection.py (ctypes); the definitions are in core/engine.py's module docstring.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

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

// The value at sorted index `rank` of b[0, len), all of them in [lo, hi]: a histogram of 1024 equal
// bins over [lo, hi] (the bin of a value is monotone in the value) finds the target's bin, whose few
// values are then moved to the front and selected. Reorders b.
float select_in_bracket(float* b, int64_t len, int64_t rank, float lo, float hi) {
    constexpr int bins = 1024;
    const float scale = bins / (hi - lo);
    if (len < 4 * bins || !std::isfinite(scale) || scale <= 0) {
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

// One row: the k largest and smallest values, and per quantile q < NQ the value at sorted index
// targets[q], found inside the bracket [lo, hi] given by the sample's order statistics.
template <int NQ>
void select_row(const float* row, int64_t n, int32_t k, const int64_t* sample, int64_t s,
                const int64_t* targets, const int64_t* lo_ranks, const int64_t* hi_ranks,
                float* tv, int64_t* ti, float* bv, int64_t* bi, float* quantiles,
                std::vector<float>& xs, std::vector<float>& band, std::vector<float>& whole) {
    for (int64_t j = 0; j < s; ++j) xs[j] = row[sample[j]];
    // Bracket ends: ascending sample ranks, each nth_element on what lies right of the previous one.
    int64_t ranks[2 * NQ];
    float ends[2 * NQ];
    for (int q = 0; q < NQ; ++q) ranks[2 * q] = lo_ranks[q], ranks[2 * q + 1] = hi_ranks[q];
    int order[2 * NQ];
    for (int e = 0; e < 2 * NQ; ++e) order[e] = e;
    std::sort(order, order + 2 * NQ, [&](int a, int b) { return ranks[a] < ranks[b]; });
    int64_t done = 0;
    for (int e : order) {
        const int64_t r = ranks[e];
        if (r < 0) ends[e] = -INFINITY;
        else if (r >= s) ends[e] = INFINITY;
        else {
            std::nth_element(xs.begin() + done, xs.begin() + r, xs.end());
            ends[e] = xs[r];
            done = r;
        }
    }
    float lo[NQ], hi[NQ];
    int64_t below[NQ], in_band[NQ];
    float* b[NQ];
    for (int q = 0; q < NQ; ++q) {
        lo[q] = ends[2 * q], hi[q] = ends[2 * q + 1];
        below[q] = in_band[q] = 0;
        b[q] = band.data() + q * (n + 1);
    }

    int32_t top_filled = 0, bottom_filled = 0;
    float top_edge = -INFINITY, bottom_edge = INFINITY;  // a value must pass these to enter a list
    const auto larger = [](float a, float b) { return a > b; };
    const auto smaller = [](float a, float b) { return a < b; };
    for (int64_t j = 0; j < n; ++j) {
        const float v = row[j];
        if (v > top_edge) {
            insert(tv, ti, top_filled, k, v, j, larger);
            if (top_filled == k) top_edge = tv[k - 1];
        }
        if (v < bottom_edge) {
            insert(bv, bi, bottom_filled, k, v, j, smaller);
            if (bottom_filled == k) bottom_edge = bv[k - 1];
        }
        for (int q = 0; q < NQ; ++q) {
            below[q] += v < lo[q];
            b[q][in_band[q]] = v;  // kept only if v is inside the bracket (branch-free)
            in_band[q] += (v >= lo[q]) & (v <= hi[q]);
        }
    }
    for (int q = 0; q < NQ; ++q) {
        const int64_t rank = targets[q] - below[q];  // the target's index among the bracketed values
        if (rank >= 0 && rank < in_band[q]) {
            quantiles[q] = select_in_bracket(b[q], in_band[q], rank, lo[q], hi[q]);
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
        std::vector<float> xs(s), band(static_cast<size_t>(n_q) * (n + 1)), whole;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            const auto row = [&](auto nq) {
                select_row<decltype(nq)::value>(x + i * n, n, k, sample, s, targets, lo_ranks, hi_ranks,
                                                top_values + i * k, top_ids + i * k, bottom_values + i * k,
                                                bottom_ids + i * k, quantiles + i * n_q, xs, band, whole);
            };
            if (n_q == 1) row(std::integral_constant<int, 1>{});
            else row(std::integral_constant<int, 2>{});
        }
    }
    return 0;
}
