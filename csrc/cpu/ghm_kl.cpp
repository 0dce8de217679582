// ghm_kl on the CPU: SED's re-weighted KL (Eq. 5) and its gradient.
//
// Forward, one pass: the data is cut into fixed blocks (independent of the thread count, handed to the
// threads by parallel_blocks); each block accumulates, per gradient-norm bin j, the count R_j and the KL sum
// S_j; the blocks are merged in index order, and loss = (1/M) sum_j S_j / R_j, which equals
// (1/M) sum_i KL_i / R_bin(g_i). Integer counts and a fixed summation order make the result deterministic.
// ghm_kl_forward's pass also writes the unweighted gradient d_i = dKL_i / ds_i (p_s - p_t, elementwise or
// per row) and, in softmax mode, the bin of every row.
// Backward, one more pass: dL/ds_i = grad * d_i / (M R_bin(g_i)), from the forward's d, in place
// (ghm_kl_weight_: a streaming multiply, the bin of an element being that of its own |d|, or its row's).
// ghm_kl_backward, for a forward that did not keep d, runs the forward's pass again (the same blocks and
// operations, hence the same d and bins) and then the same multiply.
//
// float32 runs the per-element math of ssod_math.h on packs of vectors (vectorize.h): in sigmoid mode in
// chunks of kChunk elements, first the exponentials of the chunk, then its KL, d and bins, then the bin sums
// with vector compares (three short loops keep more work in flight than one long one); in softmax mode W
// rows at a time, transposed (one vector per class, one lane per row), or for rows wider than kBatchClasses
// and the last rows of a block, a row W classes at a time. float64 runs the same math one element at a time
// (its exp and log are the C library's).
// The vector helpers pass GCC vectors by value; they are always inlined, so no call crosses the ABI that
// -Wpsabi warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../ssod_math.h"
#include "vectorize.h"

namespace ssod {
namespace {

constexpr int64_t kBlock = 1 << 15;   // elements per block of the fixed-order reduction
constexpr int64_t kChunk = 512;       // elements per step of the bin accumulation (their KL and bins stay in L1)
constexpr int32_t kMaskedBins = 32;   // up to this many bins, accumulate with vector compares, not scatters
constexpr int64_t kBatchClasses = 128;  // softmax rows up to this many classes go W at a time
constexpr int64_t kRowBuffer = 1024;  // softmax rows up to this many classes keep their exponentials in L1
constexpr int64_t kStreamBytes = int64_t(16) << 20;  // outputs this large bypass the caches

#define SSOD_INLINE_LAMBDA __attribute__((always_inline))

using simd::Float;
using simd::Int;
using simd::Pack;

// The bins of W gradient norms, as gradient_bin finds the bin of one.
template <int W>
SSOD_ALWAYS_INLINE Int<W> gradient_bins(Float<W> g, int32_t bins) {
  // g is in [0, 1] or NaN; a NaN converts to INT32_MIN, and goes to bin 0 as in gradient_bin.
  const Int<W> b = simd::to_int<W>(g * static_cast<float>(bins));
  const Int<W> low = b < 0 ? 0 : b;
  return low < bins - 1 ? low : bins - 1;
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

// One block of sigmoid-mode elements, float32: counts[j] += #{i: bin_i = j}, sums[j] += sum_{bin_i = j} KL_i,
// and with dkl not null, dkl[i] = d_i. The elements below n - n % (W U) go through the vector code, the rest
// through the same math on scalars.
template <int W, int U>
SSOD_ALWAYS_INLINE void sigmoid_block_simd(const float* s, const float* t, int64_t n, int32_t bins,
                                           int64_t* counts, double* sums, float* dkl, bool stream) {
  constexpr int64_t kPack = W * U;
  constexpr int kExpU = U < 4 ? U : 4;          // vectors per step of the exponentials
  constexpr int kKLU = kExpU > 1 ? kExpU / 2 : 1;  // vectors per step of the rest (more live values)
  static_assert(kChunk % kPack == 0, "a chunk holds whole packs");
  alignas(64) float es[kChunk], et[kChunk], kl[kChunk];
  alignas(64) int32_t bin[kChunk];
  const bool masked = bins <= kMaskedBins;
  BinLanes<W> lanes(masked ? bins : 0);
  const int64_t pack_end = n - n % kPack;
  // Streaming stores need the vectors aligned (dkl is a fresh tensor, and blocks and chunks start at
  // multiples of 64 elements, so they always are).
  const bool stream_dkl = stream && dkl != nullptr && reinterpret_cast<uintptr_t>(dkl) % (W * sizeof(float)) == 0;
  for (int64_t start = 0; start < pack_end; start += kChunk) {
    const int64_t len = std::min(kChunk, pack_end - start);
    const float* s_chunk = s + start;
    const float* t_chunk = t + start;
    for (int64_t i = 0; i < len; i += W * kExpU) {
      simd::store_pack(es + i, exp_nonpositive(-abs_value(simd::load_pack<W, kExpU>(s_chunk + i))));
      simd::store_pack(et + i, exp_nonpositive(-abs_value(simd::load_pack<W, kExpU>(t_chunk + i))));
    }
    for (int64_t i = 0; i < len; i += W * kKLU) {
      Pack<W, kKLU> kl_i, d_i;
      bernoulli_kl_of(simd::load_pack<W, kKLU>(s_chunk + i), simd::load_pack<W, kKLU>(t_chunk + i),
                      simd::load_pack<W, kKLU>(es + i), simd::load_pack<W, kKLU>(et + i), kl_i, d_i);
      if (stream_dkl) {
        for (int u = 0; u < kKLU; ++u) simd::stream<W>(dkl + start + i + u * W, d_i.v[u]);
      } else if (dkl != nullptr) {
        simd::store_pack(dkl + start + i, d_i);
      }
      simd::store_pack(kl + i, kl_i);
      for (int u = 0; u < kKLU; ++u) {
        simd::store<W>(bin + i + u * W, gradient_bins<W>(abs_value(d_i).v[u], bins));
      }
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
  if (stream_dkl) simd::stream_fence();
  if (masked) lanes.finish(bins, counts, sums);
  for (int64_t i = pack_end; i < n; ++i) {  // fewer than a pack left: the same math on scalars
    float kl_i, d_i;
    bernoulli_kl(s[i], t[i], kl_i, d_i);
    if (dkl != nullptr) dkl[i] = d_i;
    const int32_t b = gradient_bin(abs_value(d_i), bins);
    sums[b] += static_cast<double>(kl_i);
    counts[b] += 1;
  }
}

SSOD_SIMD_VERSIONS(void, sigmoid_block,
                   (const float* s, const float* t, int64_t n, int32_t bins, int64_t* counts, double* sums,
                    float* dkl, bool stream),
                   sigmoid_block_simd, (s, t, n, bins, counts, sums, dkl, stream))

// float64: the C library's exp and log1p, one element at a time.
SSOD_CPU_CLONES void sigmoid_block(const double* s, const double* t, int64_t n, int32_t bins, int64_t* counts,
                                   double* sums, double* dkl, bool) {
  for (int64_t i = 0; i < n; ++i) {
    double kl_i, d_i;
    bernoulli_kl(s[i], t[i], kl_i, d_i);
    if (dkl != nullptr) dkl[i] = d_i;
    const int32_t b = gradient_bin(abs_value(d_i), bins);
    sums[b] += kl_i;
    counts[b] += 1;
  }
}

template <int W>
SSOD_ALWAYS_INLINE Float<W> abs_lanes(Float<W> x) {
  return reinterpret_cast<Float<W>>(reinterpret_cast<Int<W>>(x) & 0x7fffffff);
}

// Calls f(weight_of), weight_of(d) giving for W values of d the weights scale[bin] of their bins (the bins of
// |d|): up to 2W bins by a lane-wise table lookup (one permute with AVX-512), beyond that gathered.
template <int W, typename F>
SSOD_ALWAYS_INLINE void with_bin_weights(const float* scale, int32_t bins, const F& f) {
  if (bins <= 2 * W) {
    alignas(64) float table[2 * W] = {};
    std::copy(scale, scale + bins, table);
    const Float<W> low = simd::load<W>(table), high = simd::load<W>(table + W);
    f([&](Float<W> d) SSOD_INLINE_LAMBDA {
      return __builtin_shuffle(low, high, gradient_bins<W>(abs_lanes<W>(d), bins));
    });
  } else {
    f([&](Float<W> d) SSOD_INLINE_LAMBDA {
      alignas(64) int32_t index[W];
      alignas(64) float w[W];
      simd::store<W>(index, gradient_bins<W>(abs_lanes<W>(d), bins));
      for (int l = 0; l < W; ++l) w[l] = scale[index[l]];
      return simd::load<W>(w);
    });
  }
}

// d_i *= scale[bin_i] in place, the bin of d_i being that of |d_i|, float32: a streaming multiply.
template <int W, int U>
SSOD_ALWAYS_INLINE void sigmoid_weight_simd(float* d, int64_t n, int32_t bins, const float* scale) {
  constexpr int64_t kPack = W * U;
  const int64_t pack_end = n - n % kPack;
  with_bin_weights<W>(scale, bins, [&](const auto& weight_of) SSOD_INLINE_LAMBDA {
    for (int64_t i = 0; i < pack_end; i += kPack) {
      const Pack<W, U> x = simd::load_pack<W, U>(d + i);
      for (int u = 0; u < U; ++u) simd::store<W>(d + i + u * W, x.v[u] * weight_of(x.v[u]));
    }
  });
  for (int64_t i = pack_end; i < n; ++i) d[i] = d[i] * scale[gradient_bin(abs_value(d[i]), bins)];
}

SSOD_SIMD_VERSIONS(void, sigmoid_weight, (float* d, int64_t n, int32_t bins, const float* scale),
                   sigmoid_weight_simd, (d, n, bins, scale))

SSOD_CPU_CLONES void sigmoid_weight(double* d, int64_t n, int32_t bins, const double* scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = d[i] * scale[gradient_bin(abs_value(d[i]), bins)];
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

// Stores the last vector of U rows of C values (as load_tails reads it): at C - W, the overlapped lanes
// getting the values they hold already; for C < W, only the first C lanes.
template <int W, int U>
SSOD_ALWAYS_INLINE void store_tails(float* x, int64_t C, const RowTail<W>& tail, const Pack<W, U>& v) {
  if (C >= W) return store_rows(x + tail.at, C, v);
  for (int u = 0; u < U; ++u) {
    alignas(64) float lanes[W];
    simd::store<W>(lanes, v.v[u]);
    for (int64_t c = 0; c < C; ++c) x[u * C + c] = lanes[c];
  }
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

// The partial maxima of U rows of C logits (W lanes each; the row maximum is the maximum of the lanes).
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> row_max_lanes(const float* x, int64_t C, const RowTail<W>& tail) {
  const int64_t whole = C - C % W;
  Pack<W, U> m;
  for (int u = 0; u < U; ++u) m.v[u] = Float<W>{} + x[u * C];
  for (int64_t c = 0; c < whole; c += W) {
    const Pack<W, U> v = load_rows<W, U>(x + c, C);
    m = where(v > m, v, m);
  }
  if (whole < C) {  // the overlap and the padding repeat logits of the row: harmless to a maximum
    const Pack<W, U> v = load_tails<W, U>(x, C, tail);
    m = where(v > m, v, m);
  }
  return m;
}

// exp(x_c - max) of U rows of C logits into e (row u at u * stride), and their partial sums (W lanes each).
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> row_exp_lanes(const float* x, int64_t C, const RowTail<W>& tail,
                                            const Pack<W, U>& max, float* e, int64_t stride) {
  const int64_t whole = C - C % W;
  Pack<W, U> sum = {};
  for (int64_t c = 0; c < whole; c += W) {
    const Pack<W, U> e_c = exp_nonpositive(load_rows<W, U>(x + c, C) - max);
    store_rows(e + c, stride, e_c);
    sum += e_c;
  }
  if (whole < C) {
    const Pack<W, U> e_c = exp_nonpositive(load_tails<W, U>(x, C, tail) - max);
    store_rows(e + tail.at, stride, e_c);  // the overlapped lanes get the values they hold already
    sum += counted_only(e_c, tail);
  }
  return sum;
}

// The partial sums (W lanes each) of the KL terms and of |p_s - p_t| of U rows of C classes, from their
// logits, exponentials (row u at u * stride) and constants; with d not null, also the rows' p_s - p_t (row u
// at d + u C).
template <int W, int U>
SSOD_ALWAYS_INLINE void row_kl_lanes(const float* s, const float* t, int64_t C, const RowTail<W>& tail,
                                     const float* es, const float* et, int64_t stride, const PackRow<W, U>& rs,
                                     const PackRow<W, U>& rt, Pack<W, U>& acc_kl, Pack<W, U>& acc_g, float* d) {
  const int64_t whole = C - C % W;
  acc_kl = {};
  acc_g = {};
  for (int64_t c = 0; c < whole; c += W) {
    Pack<W, U> kl_c, d_c;
    softmax_kl_term(load_rows<W, U>(s + c, C), load_rows<W, U>(t + c, C), load_rows<W, U>(es + c, stride),
                    load_rows<W, U>(et + c, stride), rs, rt, kl_c, d_c);
    if (d != nullptr) store_rows(d + c, C, d_c);
    acc_kl += kl_c;
    acc_g += abs_value(d_c);
  }
  if (whole < C) {
    Pack<W, U> kl_c, d_c;
    softmax_kl_term(load_tails<W, U>(s, C, tail), load_tails<W, U>(t, C, tail), load_rows<W, U>(es + tail.at, stride),
                    load_rows<W, U>(et + tail.at, stride), rs, rt, kl_c, d_c);
    if (d != nullptr) store_tails(d, C, tail, d_c);
    acc_kl += counted_only(kl_c, tail);
    acc_g += counted_only(abs_value(d_c), tail);
  }
}

// Rows of a block U at a time, then the rest one at a time: f.template operator()<R>(r) for the R rows from r.
template <int U, typename F>
SSOD_ALWAYS_INLINE void for_row_groups(int64_t rows, const F& f) {
  int64_t r = 0;
  for (; r + U <= rows; r += U) f.template operator()<U>(r);
  for (; r < rows; ++r) f.template operator()<1>(r);
}

// Rows of up to kBatchClasses classes go W at a time, transposed: column c of the W rows is one vector (lane
// r holding row r), so every per-row quantity (maximum, normaliser, KL, g) is a vector of W rows made by
// plain vector operations, with no reductions across lanes and no partial vectors at the ends of rows.
// Whole W x W tiles are transposed in registers, the last one overlapping the one before when C is not a
// multiple of W; rows narrower than W are gathered element by element. The columns of a pass go 4 at a time
// into 4 running sums, added up at the end ((0 + 1) + (2 + 3)): a fixed order, the same for every row.
template <int W>
struct BatchColumns {
  Float<W> s[kBatchClasses], t[kBatchClasses], es[kBatchClasses], et[kBatchClasses];
};

template <int W>
SSOD_ALWAYS_INLINE void load_columns(const float* x, int64_t C, Float<W>* col) {
  if (C < W) {
    for (int64_t c = 0; c < C; ++c) {
      alignas(64) float lanes[W];
      for (int r = 0; r < W; ++r) lanes[r] = x[r * C + c];
      col[c] = simd::load<W>(lanes);
    }
    return;
  }
  for (int64_t c0 = 0;; c0 += W) {
    const int64_t at = std::min(c0, C - W);
    Float<W> v[W];
    for (int r = 0; r < W; ++r) v[r] = simd::load<W>(x + r * C + at);
    simd::transpose<W>(v);
    for (int j = 0; j < W; ++j) col[at + j] = v[j];
    if (at + W >= C) break;
  }
}

template <int W>
SSOD_ALWAYS_INLINE void store_columns(const Float<W>* col, int64_t C, float* x) {
  if (C < W) {
    for (int64_t c = 0; c < C; ++c) {
      alignas(64) float lanes[W];
      simd::store<W>(lanes, col[c]);
      for (int r = 0; r < W; ++r) x[r * C + c] = lanes[r];
    }
    return;
  }
  for (int64_t c0 = 0;; c0 += W) {
    const int64_t at = std::min(c0, C - W);  // (the overlapped columns get the values they hold already)
    Float<W> v[W];
    for (int j = 0; j < W; ++j) v[j] = col[at + j];
    simd::transpose<W>(v);
    for (int r = 0; r < W; ++r) simd::store<W>(x + r * C + at, v[r]);
    if (at + W >= C) break;
  }
}

// One vector repeated in a pack.
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> repeat(Float<W> x) {
  Pack<W, U> p;
  for (int u = 0; u < U; ++u) p.v[u] = x;
  return p;
}

// f.template operator()<U>(c) for columns c .. c + U - 1: 4 at a time, then the rest one at a time.
template <int W, typename F>
SSOD_ALWAYS_INLINE void for_columns(int64_t C, const F& f) {
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) f.template operator()<4>(c);
  for (; c < C; ++c) f.template operator()<1>(c);
}

// Columns c .. c + U - 1 as a pack.
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> load_columns_pack(const Float<W>* col) {
  Pack<W, U> p;
  for (int u = 0; u < U; ++u) p.v[u] = col[u];
  return p;
}

// The 4 running sums of a pass, added up.
template <int W>
SSOD_ALWAYS_INLINE Float<W> add_running(const Pack<W, 4>& acc) {
  return (acc.v[0] + acc.v[1]) + (acc.v[2] + acc.v[3]);
}

// W rows of C <= kBatchClasses classes (s, t: the first row), float32: their KL and bins into sums and counts,
// and with dkl not null, their p_s - p_t into dkl and their bins into row_bins.
template <int W>
SSOD_ALWAYS_INLINE void softmax_batch(const float* s, const float* t, int64_t C, int32_t bins, BatchColumns<W>& col,
                                      int64_t* counts, double* sums, float* dkl, int32_t* row_bins) {
  load_columns<W>(s, C, col.s);
  load_columns<W>(t, C, col.t);
  Pack<W, 4> max_s = repeat<W, 4>(col.s[0]), max_t = repeat<W, 4>(col.t[0]);
  for_columns<W>(C, [&]<int U>(int64_t c) SSOD_INLINE_LAMBDA {
    const Pack<W, U> vs = load_columns_pack<W, U>(col.s + c), vt = load_columns_pack<W, U>(col.t + c);
    for (int u = 0; u < U; ++u) {
      const int a = U == 4 ? u : static_cast<int>(c % 4);
      max_s.v[a] = vs.v[u] > max_s.v[a] ? vs.v[u] : max_s.v[a];
      max_t.v[a] = vt.v[u] > max_t.v[a] ? vt.v[u] : max_t.v[a];
    }
  });
  const Float<W> ms0 = max_s.v[0] > max_s.v[1] ? max_s.v[0] : max_s.v[1];
  const Float<W> ms1 = max_s.v[2] > max_s.v[3] ? max_s.v[2] : max_s.v[3];
  const Float<W> mt0 = max_t.v[0] > max_t.v[1] ? max_t.v[0] : max_t.v[1];
  const Float<W> mt1 = max_t.v[2] > max_t.v[3] ? max_t.v[2] : max_t.v[3];
  const Float<W> ms = ms0 > ms1 ? ms0 : ms1, mt = mt0 > mt1 ? mt0 : mt1;
  Pack<W, 4> zs = {}, zt = {};
  for_columns<W>(C, [&]<int U>(int64_t c) SSOD_INLINE_LAMBDA {
    const Pack<W, U> es = exp_nonpositive(load_columns_pack<W, U>(col.s + c) - repeat<W, U>(ms));
    const Pack<W, U> et = exp_nonpositive(load_columns_pack<W, U>(col.t + c) - repeat<W, U>(mt));
    for (int u = 0; u < U; ++u) {
      const int a = U == 4 ? u : static_cast<int>(c % 4);
      col.es[c + u] = es.v[u];
      col.et[c + u] = et.v[u];
      zs.v[a] += es.v[u];
      zt.v[a] += et.v[u];
    }
  });
  const Float<W> sum_s = add_running<W>(zs), sum_t = add_running<W>(zt);
  const Float<W> inv_zs = 1.0f / sum_s, inv_zt = 1.0f / sum_t;
  const Float<W> log_zs = log_positive(Pack<W, 1>{{sum_s}}).v[0], log_zt = log_positive(Pack<W, 1>{{sum_t}}).v[0];
  Pack<W, 4> acc_kl = {}, acc_g = {};
  for_columns<W>(C, [&]<int U>(int64_t c) SSOD_INLINE_LAMBDA {
    const PackRow<W, U> rs{repeat<W, U>(ms), repeat<W, U>(inv_zs), repeat<W, U>(log_zs)};
    const PackRow<W, U> rt{repeat<W, U>(mt), repeat<W, U>(inv_zt), repeat<W, U>(log_zt)};
    Pack<W, U> kl_c, d_c;
    softmax_kl_term(load_columns_pack<W, U>(col.s + c), load_columns_pack<W, U>(col.t + c),
                    load_columns_pack<W, U>(col.es + c), load_columns_pack<W, U>(col.et + c), rs, rt, kl_c, d_c);
    const Pack<W, U> g_c = abs_value(d_c);
    for (int u = 0; u < U; ++u) {
      const int a = U == 4 ? u : static_cast<int>(c % 4);
      col.es[c + u] = d_c.v[u];  // (the exponentials are no longer needed)
      acc_kl.v[a] += kl_c.v[u];
      acc_g.v[a] += g_c.v[u];
    }
  });
  alignas(64) float kl[W];
  alignas(64) int32_t bin[W];
  simd::store<W>(kl, add_running<W>(acc_kl));
  simd::store<W>(bin, gradient_bins<W>(0.5f * add_running<W>(acc_g), bins));
  if (dkl != nullptr) {
    store_columns<W>(col.es, C, dkl);
    for (int r = 0; r < W; ++r) row_bins[r] = bin[r];
  }
  for (int r = 0; r < W; ++r) {
    sums[bin[r]] += static_cast<double>(kl[r]);
    counts[bin[r]] += 1;
  }
}

// softmax_kl_row of U rows of C <= kRowBuffer classes side by side (es, et: U * kRowBuffer floats), float32:
// the KL and g of each, and with d not null, the rows' p_s - p_t (row u at d + u C).
template <int W, int U>
SSOD_ALWAYS_INLINE void softmax_rows_wide(const float* s, const float* t, int64_t C, const RowTail<W>& tail,
                                          float* es, float* et, float* kl, float* g, float* d) {
  PackRow<W, U> rs, rt;
  rs.max = row_max_lanes<W, U>(s, C, tail);
  rt.max = row_max_lanes<W, U>(t, C, tail);
  for (int u = 0; u < U; ++u) {
    rs.max.v[u] = Float<W>{} + simd::max_lanes<W>(rs.max.v[u]);
    rt.max.v[u] = Float<W>{} + simd::max_lanes<W>(rt.max.v[u]);
  }
  const Pack<W, U> sum_s = row_exp_lanes<W, U>(s, C, tail, rs.max, es, kRowBuffer);
  const Pack<W, U> sum_t = row_exp_lanes<W, U>(t, C, tail, rt.max, et, kRowBuffer);
  for (int u = 0; u < U; ++u) {
    const float zs = simd::add_lanes<W>(sum_s.v[u]), zt = simd::add_lanes<W>(sum_t.v[u]);
    rs.inv_z.v[u] = Float<W>{} + 1.0f / zs;
    rt.inv_z.v[u] = Float<W>{} + 1.0f / zt;
    rs.log_z.v[u] = Float<W>{} + log_any(zs);
    rt.log_z.v[u] = Float<W>{} + log_any(zt);
  }
  Pack<W, U> acc_kl, acc_g;
  row_kl_lanes<W, U>(s, t, C, tail, es, et, kRowBuffer, rs, rt, acc_kl, acc_g, d);
  for (int u = 0; u < U; ++u) {
    kl[u] = simd::add_lanes<W>(acc_kl.v[u]);
    g[u] = 0.5f * simd::add_lanes<W>(acc_g.v[u]);
  }
}

// One block of softmax rows (C <= kRowBuffer logits each), float32; with dkl not null, also every row's
// p_s - p_t into dkl and its bin into row_bins.
template <int W, int U>
SSOD_ALWAYS_INLINE void softmax_block_simd(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                           int64_t* counts, double* sums, float* dkl, int32_t* row_bins) {
  const RowTail<W> tail(C);
  int64_t first = 0;  // the rows before it are done
  if (C <= kBatchClasses) {
    BatchColumns<W> columns;
    for (; first + W <= rows; first += W) {
      softmax_batch<W>(s + first * C, t + first * C, C, bins, columns, counts, sums,
                       dkl != nullptr ? dkl + first * C : nullptr, dkl != nullptr ? row_bins + first : nullptr);
    }
  }
  constexpr int kRows = 2;  // rows side by side (more do not pay: the rows are long enough)
  alignas(64) float es[kRows * kRowBuffer], et[kRows * kRowBuffer];
  s += first * C;
  t += first * C;
  if (dkl != nullptr) {
    dkl += first * C;
    row_bins += first;
  }
  for_row_groups<kRows>(rows - first, [&]<int R>(int64_t r) SSOD_INLINE_LAMBDA {
    float kl[R], g[R];
    softmax_rows_wide<W, R>(s + r * C, t + r * C, C, tail, es, et, kl, g, dkl != nullptr ? dkl + r * C : nullptr);
    for (int u = 0; u < R; ++u) {
      const int32_t b = gradient_bin(g[u], bins);
      if (dkl != nullptr) row_bins[r + u] = b;
      sums[b] += static_cast<double>(kl[u]);
      counts[b] += 1;
    }
  });
}

SSOD_SIMD_VERSIONS(void, softmax_block_buffered,
                   (const float* s, const float* t, int64_t rows, int64_t C, int32_t bins, int64_t* counts,
                    double* sums, float* dkl, int32_t* row_bins),
                   softmax_block_simd, (s, t, rows, C, bins, counts, sums, dkl, row_bins))

// Softmax rows of any width, one class at a time (float64, and float32 rows wider than kRowBuffer).
template <typename T>
SSOD_ALWAYS_INLINE void softmax_block_impl(const T* s, const T* t, int64_t rows, int64_t C, int32_t bins,
                                           int64_t* counts, double* sums, T* dkl, int32_t* row_bins) {
  for (int64_t r = 0; r < rows; ++r) {
    T kl, g;
    SoftmaxRow<T> rs, rt;
    softmax_kl_row(s + r * C, t + r * C, C, kl, g, rs, rt, dkl != nullptr ? dkl + r * C : nullptr);
    const int32_t b = gradient_bin(g, bins);
    if (dkl != nullptr) row_bins[r] = b;
    sums[b] += static_cast<double>(kl);
    counts[b] += 1;
  }
}

SSOD_CPU_CLONES void softmax_block_scalar(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins,
                                          int64_t* counts, double* sums, float* dkl, int32_t* row_bins) {
  softmax_block_impl(s, t, rows, C, bins, counts, sums, dkl, row_bins);
}

SSOD_CPU_CLONES void softmax_block_scalar(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins,
                                          int64_t* counts, double* sums, double* dkl, int32_t* row_bins) {
  softmax_block_impl(s, t, rows, C, bins, counts, sums, dkl, row_bins);
}

void softmax_block(const float* s, const float* t, int64_t rows, int64_t C, int32_t bins, int64_t* counts,
                   double* sums, float* dkl, int32_t* row_bins) {
  if (C <= kRowBuffer) {
    softmax_block_buffered(s, t, rows, C, bins, counts, sums, dkl, row_bins);
  } else {
    softmax_block_scalar(s, t, rows, C, bins, counts, sums, dkl, row_bins);
  }
}

void softmax_block(const double* s, const double* t, int64_t rows, int64_t C, int32_t bins, int64_t* counts,
                   double* sums, double* dkl, int32_t* row_bins) {
  softmax_block_scalar(s, t, rows, C, bins, counts, sums, dkl, row_bins);
}

// d[r, c] *= scale[row_bins[r]] in place: a streaming multiply.
template <typename T>
SSOD_ALWAYS_INLINE void softmax_weight_impl(T* d, int64_t rows, int64_t C, const int32_t* row_bins, const T* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const T w = scale[row_bins[r]];
    T* row = d + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row[c] = row[c] * w;
  }
}

SSOD_CPU_CLONES void softmax_weight(float* d, int64_t rows, int64_t C, const int32_t* row_bins, const float* scale) {
  softmax_weight_impl(d, rows, C, row_bins, scale);
}

SSOD_CPU_CLONES void softmax_weight(double* d, int64_t rows, int64_t C, const int32_t* row_bins,
                                    const double* scale) {
  softmax_weight_impl(d, rows, C, row_bins, scale);
}

// ---------------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------------

// The samples (elements in sigmoid mode, rows in softmax mode) are cut into blocks of about kBlock elements
// that depend only on the shape; the backward uses the same blocks as the forward, so every element goes
// through the same (vector or scalar) code in both and lands in the same bin.
// Softmax blocks hold a multiple of 16 rows when they can, so that their rows go 16 (or 8) at a time.
struct Blocks {
  int64_t items, per_block, count;

  static int64_t rows_per_block(int64_t C) {
    const int64_t rows = std::max<int64_t>(1, kBlock / std::max<int64_t>(C, 1));
    return rows >= 16 ? rows - rows % 16 : rows;
  }

  Blocks(bool sigmoid, int64_t rows, int64_t C)
      : items(sigmoid ? rows * C : rows),
        per_block(sigmoid ? kBlock : rows_per_block(C)),
        count((items + per_block - 1) / per_block) {}

  int64_t begin(int64_t b) const { return b * per_block; }
  int64_t size(int64_t b) const { return std::min(items, begin(b) + per_block) - begin(b); }
};

// Blocks per thread below which a thread is not worth waking: about 0.1 ms of work each.
constexpr int64_t kMinBlocksPerThread = 4;        // forward
constexpr int64_t kMinWeightBlocksPerThread = 64;  // backward multiply (some 20 times faster per element)

// dkl for large inputs: a fresh tensor of that size comes straight from the kernel, which zeroes every page on
// first touch (some 2 ms per 64 MB), and is given back when freed. So the last such buffer freed (the gradient
// of the previous step, typically) is kept, one at a time, and handed out again for the next one of the same
// size: a tensor whose deleter returns its memory here. Smaller buffers come from the allocator, which reuses
// them without page faults.
class RecycledBuffer {
 public:
  static RecycledBuffer& instance() {
    static auto* cache = new RecycledBuffer();  // never destroyed: tensors may be freed at exit
    return *cache;
  }

  at::Tensor empty_like(const at::Tensor& like) {
    const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
    std::shared_ptr<c10::DataPtr> memory, other;  // `other`, a cached buffer of another size, is freed
    {
      std::lock_guard<std::mutex> lock(mutex_);
      (cached_bytes_ == bytes ? memory : other) = std::move(cached_);
    }
    if (memory == nullptr) memory = std::make_shared<c10::DataPtr>(c10::GetCPUAllocator()->allocate(bytes));
    void* data = memory->get();
    return at::from_blob(
        data, like.sizes(), [memory, bytes](void*) { instance().give_back(memory, bytes); }, like.options());
  }

 private:
  void give_back(const std::shared_ptr<c10::DataPtr>& memory, size_t bytes) {
    std::shared_ptr<c10::DataPtr> previous;  // freed after the lock is released
    std::lock_guard<std::mutex> lock(mutex_);
    previous = std::move(cached_);
    cached_ = memory;
    cached_bytes_ = bytes;
  }

  std::mutex mutex_;
  std::shared_ptr<c10::DataPtr> cached_;
  size_t cached_bytes_ = 0;
};

// The forward of both ops: loss and counts, and with dkl defined, the unweighted gradient and the rows' bins.
void ghm_kl_forward_into(const at::Tensor& student, const at::Tensor& teacher, bool sigmoid, int64_t bins,
                         at::Tensor& loss, at::Tensor& counts, at::Tensor* dkl, at::Tensor* row_bins,
                         bool allow_stream = true) {
  const int64_t rows = student.size(0), C = student.size(1);
  const Blocks blocks(sigmoid, rows, C);
  const auto M = static_cast<int32_t>(bins);
  std::vector<int64_t> block_counts(blocks.count * bins, 0);  // (blocks, M)
  std::vector<double> block_sums(blocks.count * bins, 0.0);   // (blocks, M)

  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "ghm_kl_cpu", [&] {
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    scalar_t* d = dkl != nullptr ? dkl->mutable_data_ptr<scalar_t>() : nullptr;
    int32_t* rb = row_bins != nullptr && !sigmoid ? row_bins->mutable_data_ptr<int32_t>() : nullptr;
    // A dkl much larger than the caches is written past them (it is read again only by the backward).
    const bool stream =
        allow_stream && d != nullptr && dkl->numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
    parallel_blocks(blocks.count, kMinBlocksPerThread, [&](int64_t b) {
      const int64_t begin = blocks.begin(b), n = blocks.size(b);
      if (sigmoid) {
        sigmoid_block(s + begin, t + begin, n, M, &block_counts[b * bins], &block_sums[b * bins],
                      d != nullptr ? d + begin : nullptr, stream);
      } else {
        softmax_block(s + begin * C, t + begin * C, n, C, M, &block_counts[b * bins], &block_sums[b * bins],
                      d != nullptr ? d + begin * C : nullptr, rb != nullptr ? rb + begin : nullptr);
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
}

std::tuple<at::Tensor, at::Tensor> ghm_kl_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl");
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor counts = at::zeros({bins}, student.options().dtype(at::kLong));
  ghm_kl_forward_into(student, teacher, sigmoid, bins, loss, counts, nullptr, nullptr);
  return {loss, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghm_kl_forward_cpu(const at::Tensor& student,
                                                                              const at::Tensor& teacher,
                                                                              c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl_forward");
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor counts = at::zeros({bins}, student.options().dtype(at::kLong));
  const bool large = student.numel() * static_cast<int64_t>(student.element_size()) >= kStreamBytes;
  at::Tensor dkl = large ? RecycledBuffer::instance().empty_like(student) : at::empty_like(student);
  at::Tensor row_bins = at::empty({sigmoid ? 0 : student.size(0)}, student.options().dtype(at::kInt));
  ghm_kl_forward_into(student, teacher, sigmoid, bins, loss, counts, &dkl, &row_bins);
  return {loss, counts, dkl, row_bins};
}

// The weight of a sample in bin j: grad / (M R_j); empty bins are never looked up.
template <typename scalar_t>
std::vector<scalar_t> bin_scales(const at::Tensor& grad, const at::Tensor& counts, int64_t bins) {
  const double g = static_cast<double>(*grad.const_data_ptr<scalar_t>());
  const int64_t* R = counts.const_data_ptr<int64_t>();
  std::vector<scalar_t> scale(bins);
  for (int64_t j = 0; j < bins; ++j) {
    scale[j] = R[j] > 0 ? static_cast<scalar_t>(g / (static_cast<double>(bins) * static_cast<double>(R[j])))
                        : scalar_t(0);
  }
  return scale;
}

void ghm_kl_weight_cpu(at::Tensor& dkl, const at::Tensor& sample_bins, const at::Tensor& grad,
                       const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid =
      check_ghm_weight_inputs(dkl, sample_bins, grad, counts, mode, bins, at::kCPU, "ghm_kl_weight_");
  const int64_t rows = dkl.size(0), C = dkl.size(1);
  const Blocks blocks(sigmoid, rows, C);
  const auto M = static_cast<int32_t>(bins);

  AT_DISPATCH_FLOATING_TYPES(dkl.scalar_type(), "ghm_kl_weight_cpu", [&] {
    const std::vector<scalar_t> scale = bin_scales<scalar_t>(grad, counts, bins);
    scalar_t* d = dkl.mutable_data_ptr<scalar_t>();
    const int32_t* rb = sigmoid ? nullptr : sample_bins.const_data_ptr<int32_t>();
    parallel_blocks(blocks.count, kMinWeightBlocksPerThread, [&](int64_t b) {
      const int64_t begin = blocks.begin(b), n = blocks.size(b);
      if (sigmoid) {
        sigmoid_weight(d + begin, n, M, scale.data());
      } else {
        softmax_weight(d + begin * C, n, C, rb + begin, scale.data());
      }
    });
  });
}

// Recomputes what ghm_kl_forward keeps: the forward's pass again (the same blocks and operations, hence the
// same p_s - p_t and bins), then the weights in place. For a backward whose forward did not keep dkl.
at::Tensor ghm_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& counts, c10::string_view mode, int64_t bins) {
  const bool sigmoid = check_ghm_inputs(student, teacher, mode, bins, at::kCPU, "ghm_kl_backward");
  check_ghm_backward_inputs(grad, counts, bins, student, "ghm_kl_backward");
  at::Tensor loss = at::empty({}, student.options());
  at::Tensor recounted = at::zeros({bins}, counts.options());
  at::Tensor out = at::empty_like(student);
  at::Tensor row_bins = at::empty({sigmoid ? 0 : student.size(0)}, student.options().dtype(at::kInt));
  ghm_kl_forward_into(student, teacher, sigmoid, bins, loss, recounted, &out, &row_bins, /*allow_stream=*/false);
  ghm_kl_weight_cpu(out, row_bins, grad, counts, mode, bins);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssod_ops, CPU, m) {
  m.impl("ghm_kl", &ghm_kl_cpu);
  m.impl("ghm_kl_backward", &ghm_kl_backward_cpu);
  m.impl("ghm_kl_forward", &ghm_kl_forward_cpu);
  m.impl("ghm_kl_weight_", &ghm_kl_weight_cpu);
}

}  // namespace ssod
