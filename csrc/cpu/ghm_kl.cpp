// ghm_kl on the CPU: SED's re-weighted KL (Eq. 5) and its gradient.
//
// Forward, one pass: the data is cut into fixed blocks (independent of the thread count, handed to the
// threads by parallel_blocks); each block accumulates, per gradient-norm bin j, the count R_j and the KL sum
// S_j; the blocks are merged in index order, and loss = (1/M) sum_j S_j / R_j, which equals
// (1/M) sum_i KL_i / R_bin(g_i). Integer counts and a fixed summation order make the result deterministic.
// Backward, one pass: dL/ds_i = grad * (p_s - p_t)_i / (M R_bin(g_i)), elementwise (sigmoid) or per row.
//
// float32 runs the per-element math of ssod_math.h on packs of vectors (vectorize.h): in sigmoid mode
// W * U elements at a time, with the KL and bins of a chunk then summed bin by bin with vector compares; in
// softmax mode a row W classes at a time. float64 runs the same math one element at a time (its exp and
// log are the C library's).
// The vector helpers pass GCC vectors by value; they are always inlined, so no call crosses the ABI that
// -Wpsabi warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../ssod_math.h"
#include "vectorize.h"

namespace ssod {
namespace {

constexpr int64_t kBlock = 1 << 15;   // elements per block of the fixed-order reduction
constexpr int64_t kChunk = 512;       // elements per step of the bin accumulation (their KL and bins stay in L1)
constexpr int32_t kMaskedBins = 32;   // up to this many bins, accumulate with vector compares, not scatters
constexpr int64_t kRowBuffer = 1024;  // softmax rows up to this many classes keep their exponentials in L1

using simd::Float;
using simd::Int;
using simd::Pack;

// The bins of W gradient norms, as gradient_bin finds the bin of one.
template <int W>
SSOD_ALWAYS_INLINE Int<W> gradient_bins(Float<W> g, int32_t bins) {
  const Int<W> b = simd::to_int<W>(g * static_cast<float>(bins));
  return b < bins - 1 ? b : bins - 1;
}

// ---------------------------------------------------------------------------------------------------------
// Sigmoid mode
// ---------------------------------------------------------------------------------------------------------

// Per-bin sums and counts of one block, lane by lane (W lanes): a chunk's float sums are added to them in
// double, and the lanes are added up once, at the end of the block, in a fixed order.
template <int W>
struct BinLanes {
  static constexpr int kGroup = W >= 16 ? 8 : 4;  // bins per pass over a chunk: 2 accumulators each, in registers
  alignas(64) double sum[kMaskedBins + kGroup][W];
  alignas(64) int32_t count[kMaskedBins + kGroup][W];

  explicit BinLanes(int32_t bins) {
    std::fill(&sum[0][0], &sum[0][0] + (bins + kGroup) * W, 0.0);
    std::fill(&count[0][0], &count[0][0] + (bins + kGroup) * W, 0);
  }

  // counts[j] += #{i < n: bin_i = j}, sums[j] += sum_{bin_i = j} kl_i for a chunk of at most kChunk samples
  // (n a multiple of W), bins <= kMaskedBins.
  SSOD_ALWAYS_INLINE void add_chunk(const float* kl, const int32_t* bin, int64_t n, int32_t bins) {
    const int32_t passes = (bins + kGroup - 1) / kGroup;
    const int32_t group = (bins + passes - 1) / passes;  // the bins split evenly over the passes
    for (int32_t first = 0; first < bins; first += group) add_group<kGroup>(kl, bin, n, first, group);
  }

  // One pass over the chunk for bins first .. first + group - 1, with G = group accumulator pairs.
  template <int G>
  SSOD_ALWAYS_INLINE void add_group(const float* kl, const int32_t* bin, int64_t n, int32_t first, int32_t group) {
    if constexpr (G > 1) {
      if (group < G) return add_group<G - 1>(kl, bin, n, first, group);
    }
    Float<W> chunk_sum[G] = {};
    Int<W> chunk_count[G] = {};
    for (int64_t i = 0; i < n; i += W) {
      const Int<W> b = simd::load<W>(bin + i);
      const Float<W> k = simd::load<W>(kl + i);
      for (int j = 0; j < G; ++j) {
        const Int<W> hit = b == first + j;  // never true for first + j >= bins
        chunk_sum[j] = hit ? chunk_sum[j] + k : chunk_sum[j];  // (this form compiles to one masked add)
        chunk_count[j] = hit ? chunk_count[j] + 1 : chunk_count[j];
      }
    }
    for (int j = 0; j < G; ++j) {
      alignas(64) float lanes[W];
      simd::store<W>(lanes, chunk_sum[j]);
      simd::store<W>(count[first + j], simd::load<W>(count[first + j]) + chunk_count[j]);
#pragma omp simd
      for (int l = 0; l < W; ++l) sum[first + j][l] += static_cast<double>(lanes[l]);
    }
  }

  void finish(int32_t bins, int64_t* counts, double* sums) const {
    for (int32_t j = 0; j < bins; ++j) {
      for (int l = 0; l < W; ++l) {
        sums[j] += sum[j][l];
        counts[j] += count[j][l];
      }
    }
  }
};

// One block of sigmoid-mode elements, float32: counts[j] += #{i: bin_i = j}, sums[j] += sum_{bin_i = j} KL_i.
template <int W, int U>
SSOD_ALWAYS_INLINE void sigmoid_block_simd(const float* s, const float* t, int64_t n, int32_t bins,
                                           int64_t* counts, double* sums) {
  constexpr int64_t kPack = W * U;
  static_assert(kChunk % kPack == 0, "a chunk holds whole packs");
  alignas(64) float kl[kChunk];
  alignas(64) int32_t bin[kChunk];
  const bool masked = bins <= kMaskedBins;
  BinLanes<W> lanes(masked ? bins : 0);
  const int64_t pack_end = n - n % kPack;
  for (int64_t start = 0; start < pack_end; start += kChunk) {
    const int64_t len = std::min(kChunk, pack_end - start);
    for (int64_t i = 0; i < len; i += kPack) {
      Pack<W, U> kl_i, g_i;
      bernoulli_kl(simd::load_pack<W, U>(s + start + i), simd::load_pack<W, U>(t + start + i), kl_i, g_i);
      simd::store_pack(kl + i, kl_i);
      for (int u = 0; u < U; ++u) simd::store<W>(bin + i + u * W, gradient_bins<W>(g_i.v[u], bins));
    }
    if (masked) {
      lanes.add_chunk(kl, bin, len, bins);
    } else {
      for (int64_t i = 0; i < len; ++i) {
        sums[bin[i]] += static_cast<double>(kl[i]);
        counts[bin[i]] += 1;
      }
    }
  }
  if (masked) lanes.finish(bins, counts, sums);
  for (int64_t i = pack_end; i < n; ++i) {  // fewer than a pack left: the same math on scalars
    float kl_i, g_i;
    bernoulli_kl(s[i], t[i], kl_i, g_i);
    const int32_t b = gradient_bin(g_i, bins);
    sums[b] += static_cast<double>(kl_i);
    counts[b] += 1;
  }
}

SSOD_SIMD_VERSIONS(void, sigmoid_block,
                   (const float* s, const float* t, int64_t n, int32_t bins, int64_t* counts, double* sums),
                   sigmoid_block_simd, (s, t, n, bins, counts, sums))

// float64: the C library's exp and log1p, one element at a time.
SSOD_CPU_CLONES void sigmoid_block(const double* s, const double* t, int64_t n, int32_t bins, int64_t* counts,
                                   double* sums) {
  for (int64_t i = 0; i < n; ++i) {
    double kl_i, g_i;
    bernoulli_kl(s[i], t[i], kl_i, g_i);
    const int32_t b = gradient_bin(g_i, bins);
    sums[b] += kl_i;
    counts[b] += 1;
  }
}

// out_i = (p_s - p_t)_i * scale[bin_i], float32.
template <int W, int U>
SSOD_ALWAYS_INLINE void sigmoid_grad_simd(const float* s, const float* t, int64_t n, int32_t bins,
                                          const float* scale, float* out) {
  constexpr int64_t kPack = W * U;
  const int64_t pack_end = n - n % kPack;
  if (bins <= 2 * W) {
    // The weights of all bins fit in two vectors: a lane-wise table lookup (one permute with AVX-512).
    alignas(64) float table[2 * W] = {};
    std::copy(scale, scale + bins, table);
    const Float<W> low = simd::load<W>(table), high = simd::load<W>(table + W);
    for (int64_t i = 0; i < pack_end; i += kPack) {
      Pack<W, U> g;
      const Pack<W, U> d = bernoulli_kl_grad(simd::load_pack<W, U>(s + i), simd::load_pack<W, U>(t + i), g);
      for (int u = 0; u < U; ++u) {
        simd::store<W>(out + i + u * W, d.v[u] * __builtin_shuffle(low, high, gradient_bins<W>(g.v[u], bins)));
      }
    }
  } else {
    for (int64_t i = 0; i < pack_end; i += kPack) {
      Pack<W, U> g;
      const Pack<W, U> d = bernoulli_kl_grad(simd::load_pack<W, U>(s + i), simd::load_pack<W, U>(t + i), g);
      for (int u = 0; u < U; ++u) {
        alignas(64) int32_t b[W];
        alignas(64) float w[W];
        simd::store<W>(b, gradient_bins<W>(g.v[u], bins));
        for (int l = 0; l < W; ++l) w[l] = scale[b[l]];
        simd::store<W>(out + i + u * W, d.v[u] * simd::load<W>(w));
      }
    }
  }
  for (int64_t i = pack_end; i < n; ++i) {
    float g;
    const float d = bernoulli_kl_grad(s[i], t[i], g);
    out[i] = d * scale[gradient_bin(g, bins)];
  }
}

SSOD_SIMD_VERSIONS(void, sigmoid_grad,
                   (const float* s, const float* t, int64_t n, int32_t bins, const float* scale, float* out),
                   sigmoid_grad_simd, (s, t, n, bins, scale, out))

SSOD_CPU_CLONES void sigmoid_grad(const double* s, const double* t, int64_t n, int32_t bins, const double* scale,
                                  double* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    double g;
    const double d = bernoulli_kl_grad(s[i], t[i], g);
    out[i] = d * scale[gradient_bin(g, bins)];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Softmax mode
// ---------------------------------------------------------------------------------------------------------

// Rows are short (tens of classes): U rows go side by side, one vector of W classes of each at a time, so
// that the processor has U independent chains to overlap. The classes below C - C % W are read as whole
// vectors; when C is not a multiple of W, one last vector is read at C - W, overlapping the one before (only
// its lanes beyond that one count), or, for C < W, at 0 from a copy padded with the row's first logit (only
// the first C lanes count). A row's numbers do not depend on U or on the rows beside it.
template <int W>
struct RowTail {
  int64_t at;      // where the last vector starts
  Int<W> counted;  // its lanes that count (-1)

  explicit RowTail(int64_t C) : at(C >= W ? C - W : 0) {
    const Int<W> lane = simd::lane_index<W>();
    counted = C >= W ? lane >= static_cast<int32_t>(W - C % W) : lane < static_cast<int32_t>(C);
  }
};

// Classes c .. c + W - 1 of U rows, `stride` apart.
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> load_rows(const float* x, int64_t stride) {
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) r.v[u] = simd::load<W>(x + u * stride);
  return r;
}

// The last vector of U rows of C logits (see above).
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> load_tails(const float* x, int64_t C, const RowTail<W>& tail) {
  if (C >= W) return load_rows<W, U>(x + tail.at, C);
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) {
    alignas(64) float lanes[W];
    for (int l = 0; l < W; ++l) lanes[l] = l < C ? x[u * C + l] : x[u * C];
    r.v[u] = simd::load<W>(lanes);
  }
  return r;
}

template <int W, int U>
SSOD_ALWAYS_INLINE void store_rows(float* x, int64_t stride, const Pack<W, U>& v) {
  for (int u = 0; u < U; ++u) simd::store<W>(x + u * stride, v.v[u]);
}

template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> counted_only(const Pack<W, U>& v, const RowTail<W>& tail) {
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) r.v[u] = tail.counted ? v.v[u] : 0.0f;
  return r;
}

// Softmax constants of U rows, one per pack vector (every lane of a vector holds its row's constant).
template <int W, int U>
using PackRow = SoftmaxRow<Pack<W, U>>;

// The softmax constants (softmax_row) of U student rows and U teacher rows of C <= kRowBuffer logits,
// leaving exp(x_c - max) in es and et (row u at u * kRowBuffer). With kLogZ, the logarithms of the
// normalisers too (the KL needs them, the gradient does not).
template <int W, int U, bool kLogZ>
SSOD_ALWAYS_INLINE void softmax_rows_simd(const float* s, const float* t, int64_t C, const RowTail<W>& tail,
                                          float* es, float* et, PackRow<W, U>& rs, PackRow<W, U>& rt) {
  const int64_t whole = C - C % W;
  Pack<W, U> max_s, max_t;
  for (int u = 0; u < U; ++u) {
    max_s.v[u] = Float<W>{} + s[u * C];
    max_t.v[u] = Float<W>{} + t[u * C];
  }
  for (int64_t c = 0; c < whole; c += W) {
    const Pack<W, U> vs = load_rows<W, U>(s + c, C), vt = load_rows<W, U>(t + c, C);
    max_s = where(vs > max_s, vs, max_s);
    max_t = where(vt > max_t, vt, max_t);
  }
  if (whole < C) {  // the overlap and the padding repeat logits of the row: harmless to a maximum
    const Pack<W, U> vs = load_tails<W, U>(s, C, tail), vt = load_tails<W, U>(t, C, tail);
    max_s = where(vs > max_s, vs, max_s);
    max_t = where(vt > max_t, vt, max_t);
  }
  for (int u = 0; u < U; ++u) {
    max_s.v[u] = Float<W>{} + simd::max_lanes<W>(max_s.v[u]);
    max_t.v[u] = Float<W>{} + simd::max_lanes<W>(max_t.v[u]);
  }
  Pack<W, U> sum_s = {}, sum_t = {};
  for (int64_t c = 0; c < whole; c += W) {
    const Pack<W, U> e_s = exp_nonpositive(load_rows<W, U>(s + c, C) - max_s);
    const Pack<W, U> e_t = exp_nonpositive(load_rows<W, U>(t + c, C) - max_t);
    store_rows(es + c, kRowBuffer, e_s);
    store_rows(et + c, kRowBuffer, e_t);
    sum_s += e_s;
    sum_t += e_t;
  }
  if (whole < C) {
    const Pack<W, U> e_s = exp_nonpositive(load_tails<W, U>(s, C, tail) - max_s);
    const Pack<W, U> e_t = exp_nonpositive(load_tails<W, U>(t, C, tail) - max_t);
    store_rows(es + tail.at, kRowBuffer, e_s);  // the overlapped lanes get the values they hold already
    store_rows(et + tail.at, kRowBuffer, e_t);
    sum_s += counted_only(e_s, tail);
    sum_t += counted_only(e_t, tail);
  }
  rs.max = max_s;
  rt.max = max_t;
  for (int u = 0; u < U; ++u) {
    const float zs = simd::add_lanes<W>(sum_s.v[u]), zt = simd::add_lanes<W>(sum_t.v[u]);
    rs.inv_z.v[u] = Float<W>{} + 1.0f / zs;
    rt.inv_z.v[u] = Float<W>{} + 1.0f / zt;
    rs.log_z.v[u] = Float<W>{} + (kLogZ ? log_any(zs) : 0.0f);
    rt.log_z.v[u] = Float<W>{} + (kLogZ ? log_any(zt) : 0.0f);
  }
}

// softmax_kl_row of U rows of C <= kRowBuffer classes, float32. Without kKL only g (the backward's bin):
// the same operations, hence the same g, as with it.
template <int W, int U, bool kKL>
SSOD_ALWAYS_INLINE void softmax_kl_rows_simd(const float* s, const float* t, int64_t C, const RowTail<W>& tail,
                                             float* es, float* et, float* kl, float* g, PackRow<W, U>& rs,
                                             PackRow<W, U>& rt) {
  softmax_rows_simd<W, U, kKL>(s, t, C, tail, es, et, rs, rt);
  const int64_t whole = C - C % W;
  Pack<W, U> acc_kl = {}, acc_g = {};
  for (int64_t c = 0; c < whole; c += W) {
    Pack<W, U> kl_c, abs_diff;
    softmax_kl_term(load_rows<W, U>(s + c, C), load_rows<W, U>(t + c, C), load_rows<W, U>(es + c, kRowBuffer),
                    load_rows<W, U>(et + c, kRowBuffer), rs, rt, kl_c, abs_diff);
    if (kKL) acc_kl += kl_c;
    acc_g += abs_diff;
  }
  if (whole < C) {
    Pack<W, U> kl_c, abs_diff;
    softmax_kl_term(load_tails<W, U>(s, C, tail), load_tails<W, U>(t, C, tail),
                    load_rows<W, U>(es + tail.at, kRowBuffer), load_rows<W, U>(et + tail.at, kRowBuffer), rs, rt,
                    kl_c, abs_diff);
    if (kKL) acc_kl += counted_only(kl_c, tail);
    acc_g += counted_only(abs_diff, tail);
  }
  for (int u = 0; u < U; ++u) {
    kl[u] = kKL ? simd::add_lanes<W>(acc_kl.v[u]) : 0.0f;
    g[u] = 0.5f * simd::add_lanes<W>(acc_g.v[u]);
  }
}

// Rows of a block U at a time, then the rest one at a time: f.template operator()<R>(r) for the R rows from r.
template <int U, typename F>
SSOD_ALWAYS_INLINE void for_row_groups(int64_t rows, const F& f) {
  int64_t r = 0;
  for (; r + U <= rows; r += U) f.template operator()<U>(r);
  for (; r < rows; ++r) f.template operator()<1>(r);
}

// One block of softmax rows (C <= kRowBuffer logits each), float32.
template <int W, int U>
SSOD_ALWAYS_INLINE void softmax_block_simd(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                           int64_t* counts, double* sums) {
  constexpr int kRows = 2;  // rows side by side (more do not pay: the row loops are short)
  alignas(64) float es[kRows * kRowBuffer], et[kRows * kRowBuffer];
  const RowTail<W> tail(C);
  for_row_groups<kRows>(rows, [&]<int R>(int64_t r) {
    float kl[R], g[R];
    PackRow<W, R> rs, rt;
    softmax_kl_rows_simd<W, R, true>(s + r * C, t + r * C, C, tail, es, et, kl, g, rs, rt);
    for (int u = 0; u < R; ++u) {
      const int32_t b = gradient_bin(g[u], bins);
      sums[b] += static_cast<double>(kl[u]);
      counts[b] += 1;
    }
  });
}

SSOD_SIMD_VERSIONS(void, softmax_block_buffered,
                   (const float* s, const float* t, int64_t rows, int64_t C, int32_t bins, int64_t* counts,
                    double* sums),
                   softmax_block_simd, (s, t, rows, C, bins, counts, sums))

template <int W, int U>
SSOD_ALWAYS_INLINE void softmax_grad_simd(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                          const float* scale, float* out) {
  constexpr int kRows = 2;
  alignas(64) float es[kRows * kRowBuffer], et[kRows * kRowBuffer];
  const RowTail<W> tail(C);
  const int64_t whole = C - C % W;
  for_row_groups<kRows>(rows, [&]<int R>(int64_t r) {
    float kl[R], g[R];
    PackRow<W, R> rs, rt;
    softmax_kl_rows_simd<W, R, false>(s + r * C, t + r * C, C, tail, es, et, kl, g, rs, rt);  // the forward's bins
    Pack<W, R> w;
    for (int u = 0; u < R; ++u) w.v[u] = Float<W>{} + scale[gradient_bin(g[u], bins)];
    float* o = out + r * C;
    for (int64_t c = 0; c < whole; c += W) {
      store_rows(o + c, C,
                 w * (load_rows<W, R>(es + c, kRowBuffer) * rs.inv_z - load_rows<W, R>(et + c, kRowBuffer) * rt.inv_z));
    }
    if (whole < C && C >= W) {  // the overlapped lanes get the values they hold already
      store_rows(o + tail.at, C,
                 w * (load_rows<W, R>(es + tail.at, kRowBuffer) * rs.inv_z -
                      load_rows<W, R>(et + tail.at, kRowBuffer) * rt.inv_z));
    } else if (whole < C) {
      for (int u = 0; u < R; ++u) {
        const float* e_s = es + u * kRowBuffer;
        const float* e_t = et + u * kRowBuffer;
        const float inv_zs = rs.inv_z.v[u][0], inv_zt = rt.inv_z.v[u][0], w_u = w.v[u][0];
        for (int64_t c = 0; c < C; ++c) o[u * C + c] = w_u * (e_s[c] * inv_zs - e_t[c] * inv_zt);
      }
    }
  });
}

SSOD_SIMD_VERSIONS(void, softmax_grad_buffered,
                   (const float* s, const float* t, int64_t rows, int64_t C, int32_t bins, const float* scale,
                    float* out),
                   softmax_grad_simd, (s, t, rows, C, bins, scale, out))

// Softmax rows of any width, one class at a time (float64, and float32 rows wider than kRowBuffer).
template <typename T>
SSOD_ALWAYS_INLINE void softmax_block_impl(const T* s, const T* t, int64_t rows, int64_t C, int32_t bins,
                                           int64_t* counts, double* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    T kl, g;
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s + r * C, t + r * C, C, kl, g, rs, rt);
    const int32_t b = gradient_bin(g, bins);
    sums[b] += static_cast<double>(kl);
    counts[b] += 1;
  }
}

SSOD_CPU_CLONES void softmax_block_scalar(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                          int64_t* counts, double* sums) {
  softmax_block_impl(s, t, rows, C, bins, counts, sums);
}

SSOD_CPU_CLONES void softmax_block_scalar(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins,
                                          int64_t* counts, double* sums) {
  softmax_block_impl(s, t, rows, C, bins, counts, sums);
}

template <typename T>
SSOD_ALWAYS_INLINE void softmax_grad_impl(const T* s, const T* t, int64_t rows, int64_t C, int32_t bins,
                                          const T* scale, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s_row = s + r * C;
    const T* t_row = t + r * C;
    T kl, g;
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s_row, t_row, C, kl, g, rs, rt);  // the same g, hence the same bin, as the forward
    const T w = scale[gradient_bin(g, bins)];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T ps = exp_nonpositive(s_row[c] - rs.max) * rs.inv_z;
      const T pt = exp_nonpositive(t_row[c] - rt.max) * rt.inv_z;
      out[r * C + c] = w * (ps - pt);
    }
  }
}

SSOD_CPU_CLONES void softmax_grad_scalar(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                         const float* scale, float* out) {
  softmax_grad_impl(s, t, rows, C, bins, scale, out);
}

SSOD_CPU_CLONES void softmax_grad_scalar(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins,
                                         const double* scale, double* out) {
  softmax_grad_impl(s, t, rows, C, bins, scale, out);
}

void softmax_block(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins, int64_t* counts,
                   double* sums) {
  if (C <= kRowBuffer) {
    softmax_block_buffered(s, t, rows, C, bins, counts, sums);
  } else {
    softmax_block_scalar(s, t, rows, C, bins, counts, sums);
  }
}

void softmax_block(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins, int64_t* counts,
                   double* sums) {
  softmax_block_scalar(s, t, rows, C, bins, counts, sums);
}

void softmax_grad(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins, const float* scale,
                  float* out) {
  if (C <= kRowBuffer) {
    softmax_grad_buffered(s, t, rows, C, bins, scale, out);
  } else {
    softmax_grad_scalar(s, t, rows, C, bins, scale, out);
  }
}

void softmax_grad(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins, const double* scale,
                  double* out) {
  softmax_grad_scalar(s, t, rows, C, bins, scale, out);
}

// ---------------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------------

// The samples (elements in sigmoid mode, rows in softmax mode) are cut into blocks of about kBlock elements
// that depend only on the shape; the backward uses the same blocks as the forward, so every element goes
// through the same (vector or scalar) code in both and lands in the same bin.
struct Blocks {
  int64_t items, per_block, count;

  Blocks(bool sigmoid, int64_t rows, int64_t C)
      : items(sigmoid ? rows * C : rows),
        per_block(sigmoid ? kBlock : std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1))),
        count((items + per_block - 1) / per_block) {}

  int64_t begin(int64_t b) const { return b * per_block; }
  int64_t size(int64_t b) const { return std::min(items, begin(b) + per_block) - begin(b); }
};

constexpr int64_t kMinBlocksPerThread = 4;  // about 0.1 ms of work: less is not worth waking a thread for

std::tuple<at::Tensor, at::Tensor> ghm_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl");
  const int64_t rows = student.size(0), C = student.size(1);
  const Blocks blocks(sigmoid, rows, C);
  const auto M = static_cast<int32_t>(bins);

  std::vector<int64_t> block_counts(blocks.count * bins, 0);  // (blocks, M)
  std::vector<double> block_sums(blocks.count * bins, 0.0);   // (blocks, M)
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor counts = at::zeros({bins}, student.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_cpu", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    parallel_blocks(blocks.count, kMinBlocksPerThread, [&](int64_t b) {
      const int64_t begin = blocks.begin(b), n = blocks.size(b);
      if (sigmoid) {
        sigmoid_block(s + begin, t + begin, n, M, &block_counts[b * bins], &block_sums[b * bins]);
      } else {
        softmax_block(s + begin * C, t + begin * C, n, C, M, &block_counts[b * bins], &block_sums[b * bins]);
      }
    });
    // Merge the blocks in index order, then Eq. 5 bin by bin.
    int64_t* total_counts = counts.mutable_data_ptr<int64_t>();
    std::vector<double> total_sums(bins, 0.0);
    for (int64_t b = 0; b < blocks.count; ++b) {
      for (int64_t j = 0; j < bins; ++j) {
        total_counts[j] += block_counts[b * bins + j];
        total_sums[j] += block_sums[b * bins + j];
      }
    }
    double total = 0.0;
    for (int64_t j = 0; j < bins; ++j) {
      if (total_counts[j] > 0) total += total_sums[j] / static_cast<double>(total_counts[j]);
    }
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total / static_cast<double>(bins));
  });
  return {loss, counts};
}

at::Tensor ghm_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl_backward");
  check_ghm_backward_inputs(grad, counts, bins, student, "ghm_kl_backward");
  const int64_t rows = student.size(0), C = student.size(1);
  const Blocks blocks(sigmoid, rows, C);
  const auto M = static_cast<int32_t>(bins);
  at::Tensor out = at::empty_like(student);

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_backward_cpu", [&] {
    // The weight of a sample in bin j: grad / (M R_j); empty bins are never looked up.
    const double g = static_cast<double>(*grad.const_data_ptr<scalar_t>());
    const int64_t* R = counts.const_data_ptr<int64_t>();
    std::vector<scalar_t> scale(bins);
    for (int64_t j = 0; j < bins; ++j) {
      scale[j] = R[j] > 0 ? static_cast<scalar_t>(g / (static_cast<double>(bins) * static_cast<double>(R[j])))
                          : scalar_t(0);
    }
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    parallel_blocks(blocks.count, kMinBlocksPerThread, [&](int64_t b) {
      const int64_t begin = blocks.begin(b), n = blocks.size(b);
      if (sigmoid) {
        sigmoid_grad(s + begin, t + begin, n, M, scale.data(), o + begin);
      } else {
        softmax_grad(s + begin * C, t + begin * C, n, C, M, scale.data(), o + begin * C);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CPU, m) {
  m.impl("ghm_kl", &ghm_kl_cpu);
  m.impl("ghm_kl_backward", &ghm_kl_backward_cpu);
}

}  // namespace ssod
