// Every per-row statistic of the engine (core/compute/engine.py's module docstring has the definitions), streamed
// over column blocks of a score tile while each block is in cache: optional softcap, the k largest /
// smallest values, exact quantiles by sample bracketing (the row's sample fixes the brackets before its
// blocks arrive; a bracket that misses is reported and selected over the whole row), mean, std and the
// softmax statistics (a running peak, rescaled when it rises). Built and called by core/compute/rowstats.py
// (ctypes). Vector loops use AVX-512 where the compiler targets it; the portable loops compute the same
// definitions (tests check both builds).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// W float lanes (GCC vector extensions): 16 where the compiler targets AVX-512, else 8 (AVX2 on most
// x86 CPUs; two halves elsewhere). Lane-wise arithmetic, comparisons and selects.
#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

inline vf splat(float v) { return vf{} + v; }
inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf v) {
    float s = 0;
    for (int l = 0; l < W; ++l) s += v[l];
    return s;
}

// e^x, 1-2 ulp: Cephes expf (range reduction by ln 2 in two parts, degree-6 polynomial), x clamped to
// [-87.33654, 88] so that 2^n is a normal float.
inline vf exp_v(vf x) {
    x = vmin(vmax(x, splat(-87.33654f)), splat(88.0f));
    const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: + - 1.5 * 2^23
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = p * r + c;
    p = p * (r * r) + (r + 1.0f);
    const vi two_n = (__builtin_convertvector(n, vi) + 127) << 23;  // the bits of 2^n
    return p * (vf)two_n;  // a vector cast keeps the bits
}

// tanh(y), 1-2 ulp: Cephes tanhf (odd polynomial below |y| = 0.625, 1 - 2 / (e^2|y| + 1) above).
inline vf tanh_v(vf y) {
    const vf a = y < 0 ? -y : y, z = y * y;
    vf p = splat(-5.70498872745e-3f);
    for (float c : {2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f, -3.33332819422e-1f}) p = p * z + c;
    const vf small = p * z * y + y;
    const vf large = 1.0f - 2.0f / (exp_v(a + a) + 1.0f);
    return a < 0.625f ? small : (y < 0 ? -large : large);
}

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
    for (j = 0; j + W <= n; j += W) store(out + j, tanh_v(load(out + j) / cap) * cap);
    for (; j < n; ++j) out[j] = cap * std::tanh(out[j] / cap);
    return out;
}

// The smallest and largest value of row[from, to) into mn / mx (which start at +inf / -inf); returns
// the block's sum.
inline double block_range(const float* row, int64_t from, int64_t to, float& mn, float& mx) {
    int64_t j = from;
    float sum = 0;
    if (to - from >= W) {
        vf lo_v = splat(INFINITY), hi_v = splat(-INFINITY), sum_v = splat(0.0f);
        for (; j + W <= to; j += W) {
            const vf v = load(row + j);
            lo_v = vmin(lo_v, v), hi_v = vmax(hi_v, v), sum_v += v;
        }
        for (int l = 0; l < W; ++l) mn = std::min(mn, lo_v[l]), mx = std::max(mx, hi_v[l]);
        sum = hsum(sum_v);
    }
    for (; j < to; ++j) {
        mn = std::min(mn, row[j]);
        mx = std::max(mx, row[j]);
        sum += row[j];
    }
    return sum;
}

// Over row[from, to): sum (x - shift)^2, sum e and sum e * (x - peak) with e = exp(x - peak), added to
// acc[0..2] (float within the block, double across blocks).
inline void block_moments(const float* row, int64_t from, int64_t to, float shift, float peak, double* acc) {
    int64_t j = from;
    float sq = 0, z = 0, zd = 0;
    if (to - from >= W) {
        vf sq_v = splat(0.0f), z_v = splat(0.0f), zd_v = splat(0.0f);
        for (; j + W <= to; j += W) {
            const vf v = load(row + j), c = v - shift, d = v - peak, e = exp_v(d);
            sq_v += c * c, z_v += e, zd_v += e * d;
        }
        sq = hsum(sq_v), z = hsum(z_v), zd = hsum(zd_v);
    }
    for (; j < to; ++j) {
        const float c = row[j] - shift, d = row[j] - peak, e = std::exp(d);
        sq += c * c;
        z += e;
        zd += e * d;
    }
    acc[0] += sq, acc[1] += z, acc[2] += zd;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// Per 8-bit lane mask: the set lanes' indices in order (then zeros), for _mm256_permutevar8x32_ps.
struct LeftPack {
    int32_t lanes[256][8];
    constexpr LeftPack() : lanes() {
        for (int mask = 0; mask < 256; ++mask)
            for (int lane = 0, kept = 0; lane < 8; ++lane)
                if (mask >> lane & 1) lanes[mask][kept++] = lane;
    }
};
constexpr LeftPack LEFT_PACK;
#endif

// Over row[from, to): returns how many values are below lo, and appends those in [lo, hi] at out
// (which advances; out needs 16 floats of slack). AVX-512 compresses 16 lanes at a time, AVX2
// left-packs 8; the portable loop keeps each value branch-free.
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
#elif defined(__AVX2__)  // 8 lanes; a vector's inside values left-packed by a permutation
    const __m256 lo_v = _mm256_set1_ps(lo), hi_v = _mm256_set1_ps(hi);
    for (; j + 8 <= to; j += 8) {
        const __m256 v = _mm256_loadu_ps(row + j);
        const int under = _mm256_movemask_ps(_mm256_cmp_ps(v, lo_v, _CMP_LT_OQ));
        const int inside = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, lo_v, _CMP_GE_OQ), _mm256_cmp_ps(v, hi_v, _CMP_LE_OQ)));
        below += __builtin_popcount(under);
        if (!inside) continue;
        const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK.lanes[inside]));
        _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(v, order));
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

// Inserts every value of row[from, to) that beats `edge` into the list (see insert), as column col0 + j;
// `edge` becomes the list's last value once it holds k.
template <class Before>
inline void keep_extremes(const float* row, int64_t from, int64_t to, int64_t col0, int32_t k, float* vals,
                          int64_t* ids, int32_t& filled, float& edge, Before before) {
    for (int64_t j = from; j < to; ++j) {
        if (!before(row[j], edge)) continue;
        insert(vals, ids, filled, k, row[j], col0 + j, before);
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

// The running statistics of m rows of length n whose values arrive in column blocks (ascending
// column order, every column once), after the row's sample has fixed each quantile's bracket.
struct Stream {
    int64_t m, n;
    int32_t k;
    float cap;
    int64_t lo_ranks[NQ], hi_ranks[NQ];
    std::vector<float> tv, bv;  // (m, k) top / bottom lists, values
    std::vector<int64_t> ti, bi;
    std::vector<int32_t> top_filled, bottom_filled;
    std::vector<float> top_edge, bottom_edge;  // a value must beat these to enter a list
    std::vector<float> ends;                   // (m, 2 NQ): each quantile's bracket [lo, hi]
    std::vector<float> shift, peak;            // the sample's mean (centres the std), the running max
    std::vector<double> sum, acc;              // sum x; (m, 3): sum (x - shift)^2, z, sum e (x - peak)
    std::vector<int64_t> below, used;          // (m, NQ): values below lo; bracketed values gathered
    std::vector<std::vector<float>> band;      // (m, NQ): the bracketed values
};

// Row i's sample (s values, softcapped already): the quantiles' brackets, the std's centre and a
// first peak (a lower bound of the row's maximum).
void take_sample(Stream& st, int64_t i, std::vector<float>& xs) {
    double total = 0;
    float top = -INFINITY;
    for (float v : xs) total += v, top = std::max(top, v);
    st.shift[i] = static_cast<float>(total / xs.size());
    st.peak[i] = top;
    int64_t ranks[2 * NQ];
    float ends[2 * NQ];
    for (int q = 0; q < NQ; ++q) ranks[2 * q] = st.lo_ranks[q], ranks[2 * q + 1] = st.hi_ranks[q];
    sample_ends(xs, ranks, ends);
    std::copy(ends, ends + 2 * NQ, st.ends.begin() + i * 2 * NQ);
    const double expected = st.n * (st.hi_ranks[0] - st.lo_ranks[0] + 2.0) / xs.size();
    for (int q = 0; q < NQ; ++q) st.band[i * NQ + q].resize(std::min<int64_t>(st.n, 1.25 * expected) + 64);
}

// Columns [col0, col0 + len) of row i: the lists, the quantiles' counts and bands, the sums, then (the
// segment's maximum known) the moments against the running peak, rescaled when the peak rises.
void absorb(Stream& st, int64_t i, const float* seg, int64_t len, int64_t col0) {
    const int32_t k = st.k;
    float* tv = st.tv.data() + i * k;
    float* bv = st.bv.data() + i * k;
    int64_t* ti = st.ti.data() + i * k;
    int64_t* bi = st.bi.data() + i * k;
    const float* ends = st.ends.data() + i * 2 * NQ;
    float* out[NQ];
    for (int q = 0; q < NQ; ++q) {
        std::vector<float>& band = st.band[i * NQ + q];
        const int64_t used = st.used[i * NQ + q];
        if (static_cast<int64_t>(band.size()) < used + len + 16) band.resize(std::max(2 * band.size(), size_t(used + len + 16)));
        out[q] = band.data() + used;
    }
    const auto larger = [](float a, float b) { return a > b; };
    const auto smaller = [](float a, float b) { return a < b; };
    float seg_max = -INFINITY;
    double sum = 0;
    for (int64_t j0 = 0; j0 < len; j0 += BLOCK) {
        const int64_t j1 = std::min(len, j0 + BLOCK);
        float mn = INFINITY, mx = -INFINITY;
        sum += block_range(seg, j0, j1, mn, mx);
        seg_max = std::max(seg_max, mx);
        if (mx > st.top_edge[i])
            keep_extremes(seg, j0, j1, col0, k, tv, ti, st.top_filled[i], st.top_edge[i], larger);
        if (mn < st.bottom_edge[i])
            keep_extremes(seg, j0, j1, col0, k, bv, bi, st.bottom_filled[i], st.bottom_edge[i], smaller);
        for (int q = 0; q < NQ; ++q)
            st.below[i * NQ + q] += count_and_gather(seg, j0, j1, ends[2 * q], ends[2 * q + 1], out[q]);
    }
    for (int q = 0; q < NQ; ++q) st.used[i * NQ + q] = out[q] - st.band[i * NQ + q].data();
    st.sum[i] += sum;

    double* acc = st.acc.data() + i * 3;
    if (seg_max > st.peak[i]) {  // e' = e exp(d), x - peak' = (x - peak) + d, with d = peak - peak' < 0
        const double d = static_cast<double>(st.peak[i]) - seg_max, scale = std::exp(d);
        acc[2] = scale * (acc[2] + d * acc[1]);
        acc[1] *= scale;
        st.peak[i] = seg_max;
    }
    for (int64_t j0 = 0; j0 < len; j0 += BLOCK) block_moments(seg, j0, std::min(len, j0 + BLOCK), st.shift[i], st.peak[i], acc);
}

// Row i's results: per quantile the value at sorted index targets[q] if its bracket holds it (else
// missed[q] = 1 and the caller selects over the whole row), then the moments.
void finish_row(Stream& st, int64_t i, const int64_t* targets, float* out_stats, uint8_t* missed) {
    for (int q = 0; q < NQ; ++q) {
        const int64_t rank = targets[q] - st.below[i * NQ + q];  // the target's index among the bracketed values
        const float* ends = st.ends.data() + i * 2 * NQ;
        missed[q] = !(rank >= 0 && rank < st.used[i * NQ + q]);
        out_stats[q] = missed[q] ? NAN : select_in_bracket(st.band[i * NQ + q].data(), st.used[i * NQ + q], rank,
                                                            ends[2 * q], ends[2 * q + 1]);
    }
    const int32_t k = st.k;
    const double* acc = st.acc.data() + i * 3;
    const double n = st.n, mean = st.sum[i] / n, centred = mean - st.shift[i], peak = st.peak[i];
    double top_mass = 0;
    for (int32_t j = 0; j < k; ++j) top_mass += std::exp(static_cast<double>(st.tv[i * k + j]) - peak);
    float* m = out_stats + NQ;
    m[0] = mean;
    m[1] = std::sqrt(std::max(0.0, acc[0] / n - centred * centred));  // E (x - shift)^2 - (mean - shift)^2
    m[2] = 1.0 / acc[1];
    m[3] = std::log(acc[1]) - acc[2] / acc[1];  // entropy = log z - sum p (x - peak)
    m[4] = top_mass / acc[1];
}

}  // namespace

// A stream over m rows of length n: k-long lists, softcap when cap > 0, n_q = 2 quantiles whose
// brackets span the sample ranks [lo_ranks[q], hi_ranks[q]]. Null for another n_q.
extern "C" void* weightlens_stream_new(int64_t m, int64_t n, int32_t k, float cap, int32_t n_q, const int64_t* lo_ranks,
                                       const int64_t* hi_ranks) {
    if (n_q != NQ) return nullptr;
    Stream* st = new Stream();
    st->m = m, st->n = n, st->k = k, st->cap = cap;
    std::copy(lo_ranks, lo_ranks + NQ, st->lo_ranks);
    std::copy(hi_ranks, hi_ranks + NQ, st->hi_ranks);
    st->tv.assign(m * k, 0), st->bv.assign(m * k, 0), st->ti.assign(m * k, 0), st->bi.assign(m * k, 0);
    st->top_filled.assign(m, 0), st->bottom_filled.assign(m, 0);
    st->top_edge.assign(m, -INFINITY), st->bottom_edge.assign(m, INFINITY);
    st->ends.assign(m * 2 * NQ, 0), st->shift.assign(m, 0), st->peak.assign(m, -INFINITY);
    st->sum.assign(m, 0), st->acc.assign(m * 3, 0), st->below.assign(m * NQ, 0), st->used.assign(m * NQ, 0);
    st->band.resize(m * NQ);
    return st;
}

extern "C" void weightlens_stream_free(void* handle) { delete static_cast<Stream*>(handle); }

// The rows' sample scores xs (m, s), float32 or bfloat16, before the softcap.
extern "C" void weightlens_stream_sample(void* handle, const void* xs, int32_t bf16, int64_t s, int32_t threads) {
    Stream& st = *static_cast<Stream*>(handle);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> buffer(s), values(s);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < st.m; ++i) {
            const float* row = load_row(xs, bf16 != 0, i, s, st.cap, buffer.data());
            values.assign(row, row + s);
            take_sample(st, i, values);
        }
    }
}

// Scores x (m, cols) of columns [col0, col0 + cols), float32 or bfloat16, before the softcap.
extern "C" void weightlens_stream_block(void* handle, const void* x, int32_t bf16, int64_t cols, int64_t col0,
                                        int32_t threads) {
    Stream& st = *static_cast<Stream*>(handle);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> buffer(cols);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < st.m; ++i) absorb(st, i, load_row(x, bf16 != 0, i, cols, st.cap, buffer.data()), cols, col0);
    }
}

// Top / bottom values and ids (m, k); stats (m, n_q + 5): the quantiles (NaN where missed (m, n_q) is
// set), then mean, std, softmax_max, softmax_entropy, topk_mass.
extern "C" void weightlens_stream_finish(void* handle, const int64_t* targets, float* top_values, int64_t* top_ids,
                                         float* bottom_values, int64_t* bottom_ids, float* stats, uint8_t* missed,
                                         int32_t threads) {
    Stream& st = *static_cast<Stream*>(handle);
    const int64_t mk = st.m * st.k;
    std::copy(st.tv.begin(), st.tv.begin() + mk, top_values), std::copy(st.ti.begin(), st.ti.begin() + mk, top_ids);
    std::copy(st.bv.begin(), st.bv.begin() + mk, bottom_values), std::copy(st.bi.begin(), st.bi.begin() + mk, bottom_ids);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < st.m; ++i) finish_row(st, i, targets, stats + i * (NQ + N_MOMENTS), missed + i * NQ);
}

// Whole rows x (m, n), float32 or bfloat16, softcapped when cap > 0: out (m, n_q) the values at sorted
// indices targets[q] (the quantiles of rows whose brackets missed).
extern "C" void weightlens_select(const void* x, int32_t bf16, int64_t m, int64_t n, float cap, int32_t n_q,
                                  const int64_t* targets, float* out, int32_t threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> buffer(n), whole;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i) {
            const float* row = load_row(x, bf16 != 0, i, n, cap, buffer.data());
            for (int q = 0; q < n_q; ++q) {
                whole.assign(row, row + n);
                std::nth_element(whole.begin(), whole.begin() + targets[q], whole.end());
                out[i * n_q + q] = whole[targets[q]];
            }
        }
    }
}
