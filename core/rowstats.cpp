// Every per-row statistic of the engine (core/engine.py's module docstring has the definitions) for a
// float32 or bfloat16 score block, one row at a time while it is in cache: optional softcap, the k
// largest / smallest values, exact quantiles by sample bracketing, mean, std and the softmax
// statistics. Built and called by core/rowstats.py (ctypes). Vector loops use AVX-512 where the
// compiler targets it; the portable loops compute the same definitions (tests check both builds).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
inline __m512 splat(float v) { return _mm512_set1_ps(v); }

// e^x, 1-2 ulp: Cephes expf (range reduction by ln 2 in two parts, degree-6 polynomial), clamped to
// the finite float range.
inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, splat(-87.33654f)), splat(88.37626f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, splat(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, splat(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, splat(-2.12194440e-4f), r);
    __m512 p = splat(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm512_fmadd_ps(p, r, splat(c));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, splat(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// tanh(y), 1-2 ulp: Cephes tanhf (odd polynomial below |y| = 0.625, 1 - 2 / (e^2|y| + 1) above).
inline __m512 tanh_ps(__m512 y) {
    const __m512 a = _mm512_abs_ps(y), z = _mm512_mul_ps(y, y);
    __m512 p = splat(-5.70498872745e-3f);
    for (float c : {2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f, -3.33332819422e-1f})
        p = _mm512_fmadd_ps(p, z, splat(c));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), y, y);
    const __m512 e = exp_ps(_mm512_add_ps(a, a));
    __m512 large = _mm512_sub_ps(splat(1.0f), _mm512_div_ps(splat(2.0f), _mm512_add_ps(e, splat(1.0f))));
    large = _mm512_or_ps(large, _mm512_and_ps(y, splat(-0.0f)));  // the sign of y
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, splat(0.625f), _CMP_LT_OQ), large, small);
}
#endif

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

// Row i of the block as float32 in `out`, softcapped (cap * tanh(x / cap)) when cap > 0; returns the
// row itself when it is float32 and uncapped.
const float* load_row(const void* x, bool bf16, int64_t i, int64_t n, float cap, float* out) {
    if (!bf16 && cap <= 0) return static_cast<const float*>(x) + i * n;
    int64_t j = 0;
    if (bf16) {  // bfloat16 is the high half of a float32
        const uint16_t* src = static_cast<const uint16_t*>(x) + i * n;
        for (; j < n; ++j) {
            const uint32_t bits = static_cast<uint32_t>(src[j]) << 16;
            std::memcpy(out + j, &bits, 4);
        }
    } else {
        std::memcpy(out, static_cast<const float*>(x) + i * n, n * 4);
    }
    if (cap <= 0) return out;
    j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(out + j, _mm512_mul_ps(tanh_ps(_mm512_div_ps(_mm512_loadu_ps(out + j), splat(cap))), splat(cap)));
#endif
    for (; j < n; ++j) out[j] = cap * std::tanh(out[j] / cap);
    return out;
}

// The smallest and largest value of row[from, to) into mn / mx (which start at +inf / -inf); returns
// the block's sum.
inline double block_range(const float* row, int64_t from, int64_t to, float& mn, float& mx) {
    int64_t j = from;
    float sum = 0;
#if defined(__AVX512F__)
    __m512 lo_v = splat(INFINITY), hi_v = splat(-INFINITY), sum_v = splat(0.0f);
    for (; j + 16 <= to; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        lo_v = _mm512_min_ps(lo_v, v);
        hi_v = _mm512_max_ps(hi_v, v);
        sum_v = _mm512_add_ps(sum_v, v);
    }
    mn = _mm512_reduce_min_ps(lo_v);
    mx = _mm512_reduce_max_ps(hi_v);
    sum = _mm512_reduce_add_ps(sum_v);
#endif
    for (; j < to; ++j) {
        mn = std::min(mn, row[j]);
        mx = std::max(mx, row[j]);
        sum += row[j];
    }
    return sum;
}

// Over row[from, to): sum (x - mean)^2, sum e and sum e * (x - peak) with e = exp(x - peak), added to
// acc[0..2] (float within the block, double across blocks).
inline void block_moments(const float* row, int64_t from, int64_t to, float mean, float peak, double* acc) {
    int64_t j = from;
    float sq = 0, z = 0, zd = 0;
#if defined(__AVX512F__)
    __m512 sq_v = splat(0.0f), z_v = splat(0.0f), zd_v = splat(0.0f);
    for (; j + 16 <= to; j += 16) {
        const __m512 v = _mm512_loadu_ps(row + j);
        const __m512 c = _mm512_sub_ps(v, splat(mean)), d = _mm512_sub_ps(v, splat(peak)), e = exp_ps(d);
        sq_v = _mm512_fmadd_ps(c, c, sq_v);
        z_v = _mm512_add_ps(z_v, e);
        zd_v = _mm512_fmadd_ps(e, d, zd_v);
    }
    sq = _mm512_reduce_add_ps(sq_v);
    z = _mm512_reduce_add_ps(z_v);
    zd = _mm512_reduce_add_ps(zd_v);
#endif
    for (; j < to; ++j) {
        const float c = row[j] - mean, d = row[j] - peak, e = std::exp(d);
        sq += c * c;
        z += e;
        zd += e * d;
    }
    acc[0] += sq, acc[1] += z, acc[2] += zd;
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

constexpr int64_t BLOCK = 64;
constexpr int NQ = 2;         // quantiles: the median and P75
constexpr int N_MOMENTS = 5;  // mean, std, softmax_max, softmax_entropy, topk_mass

// One row: the k largest and smallest values, per quantile q < NQ the value at sorted index
// targets[q] (found inside the bracket [lo, hi] that the sample's order statistics give), then the
// moments. The row is read in blocks of 64; a block's range decides whether it can touch the lists.
void row_stats(const float* row, int64_t n, int32_t k, const int64_t* sample, const int64_t* targets,
               const int64_t* lo_ranks, const int64_t* hi_ranks, float* tv, int64_t* ti, float* bv, int64_t* bi,
               float* out_stats, std::vector<float>& xs, std::vector<float>& band, std::vector<float>& whole) {
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
    double sum = 0;
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t j1 = std::min(n, j0 + BLOCK);
        float mn = INFINITY, mx = -INFINITY;
        sum += block_range(row, j0, j1, mn, mx);
        if (mx > top_edge) keep_extremes(row, j0, j1, k, tv, ti, top_filled, top_edge, larger);
        if (mn < bottom_edge) keep_extremes(row, j0, j1, k, bv, bi, bottom_filled, bottom_edge, smaller);
        for (int q = 0; q < NQ; ++q) below[q] += count_and_gather(row, j0, j1, ends[2 * q], ends[2 * q + 1], out[q]);
    }
    for (int q = 0; q < NQ; ++q) {
        const int64_t rank = targets[q] - below[q];  // the target's index among the bracketed values
        if (rank >= 0 && rank < out[q] - start[q]) {
            out_stats[q] = select_in_bracket(start[q], out[q] - start[q], rank, ends[2 * q], ends[2 * q + 1]);
        } else {  // the sample's bracket missed: select over the whole row
            whole.assign(row, row + n);
            std::nth_element(whole.begin(), whole.begin() + targets[q], whole.end());
            out_stats[q] = whole[targets[q]];
        }
    }

    const double mean = sum / n;
    const float peak = tv[0];
    double acc[3] = {};  // sum (x - mean)^2, z = sum exp(x - peak), sum exp(x - peak) * (x - peak)
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) block_moments(row, j0, std::min(n, j0 + BLOCK), mean, peak, acc);
    double top_mass = 0;
    for (int32_t i = 0; i < k; ++i) top_mass += std::exp(static_cast<double>(tv[i]) - peak);
    float* m = out_stats + NQ;
    m[0] = mean;
    m[1] = std::sqrt(acc[0] / n);
    m[2] = 1.0 / acc[1];
    m[3] = std::log(acc[1]) - acc[2] / acc[1];  // entropy = log z - sum p (x - peak)
    m[4] = top_mass / acc[1];
}

}  // namespace

// Statistics of the m rows (length n) of x, float32 or bfloat16 (x_bf16), softcapped when cap > 0:
// top/bottom values and ids (m, k); stats (m, n_q + 5): the n_q = 2 quantiles, then mean, std,
// softmax_max, softmax_entropy, topk_mass. Returns 1 for another n_q.
extern "C" int weightlens_row_stats(
    const void* x, int32_t x_bf16, int64_t m, int64_t n, float cap, int32_t k,
    const int64_t* sample, int64_t s, int32_t n_q, const int64_t* targets, const int64_t* lo_ranks,
    const int64_t* hi_ranks, float* top_values, int64_t* top_ids, float* bottom_values, int64_t* bottom_ids,
    float* stats, int32_t threads) {
    if (n_q != NQ) return 1;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> xs(s), band(NQ * (n + 16)), whole, buffer(n);  // per thread
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            const float* row = load_row(x, x_bf16 != 0, i, n, cap, buffer.data());
            row_stats(row, n, k, sample, targets, lo_ranks, hi_ranks, top_values + i * k, top_ids + i * k,
                      bottom_values + i * k, bottom_ids + i * k, stats + i * (NQ + N_MOMENTS), xs, band, whole);
        }
    }
    return 0;
}
