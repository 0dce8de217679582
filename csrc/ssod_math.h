// Per-element math of the fused ops, shared by the CPU and the CUDA kernels.
//
// Everything here is an inline __host__ __device__ function of scalars (or of one row), free of branches
// that would stop a compiler from vectorising the CPU loops that call it, so the CPU tests exercise the
// same formulas the GPU runs. The per-element functions are templates that the CPU's vector loops also
// instantiate with packs of float lanes (see Lanes<V> below): one definition of the math for the GPU,
// the CPU's vector loops and their scalar remainders. float32 uses its own exp (a range reduction and a
// polynomial, within about one ulp) and logarithm of a ratio (a short series, no range reduction) because the
// C library's cannot be vectorised; float64 uses the C library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SSOD_HD __host__ __device__ __forceinline__
#else
#define SSOD_HD inline __attribute__((always_inline))
#endif

// On the CPU, the reductions over a row are vectorised too (`omp simd`; the order is then fixed by the
// vector width of the build, so results stay deterministic). Device code ignores them.
#define SSOD_PRAGMA(x) _Pragma(#x)
#if defined(__CUDA_ARCH__)
#define SSOD_SIMD_REDUCE(op, ...)
#else
#define SSOD_SIMD_REDUCE(op, ...) SSOD_PRAGMA(omp simd reduction(op : __VA_ARGS__))
#endif

namespace ssod {

// ---------------------------------------------------------------------------------------------------------
// Elementary functions
// ---------------------------------------------------------------------------------------------------------

SSOD_HD float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

SSOD_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_int(x));
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

SSOD_HD uint64_t double_to_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

// The per-element functions below are templates over a "value" type V: a scalar (float or double), or, in
// the vector loops of the CPU kernels, a pack of float lanes (simd::Pack in cpu/vectorize.h). They use only
// what both support: arithmetic with scalars, comparisons, and flat selects written where(c, a, b) (c ? a : b
// for scalars; the pack overloads are found by argument-dependent lookup). So the vector loops evaluate
// exactly the formulas the scalar code and the GPU evaluate. Lanes<V> names the element type and holds the
// one bit-level step (2^n from an integral n) that a vector does differently.
template <typename V>
struct Lanes;

template <>
struct Lanes<float> {
  using Elem = float;
  // 2^n for an integral n in [-126, 127].
  static SSOD_HD float pow2(float n) { return bits_to_float((static_cast<int32_t>(n) + 127) << 23); }
  // x 2^n for an integral n in [-126, 127] and a normal result (exact).
  static SSOD_HD float times_pow2(float x, float n) { return x * pow2(n); }
};

template <>
struct Lanes<double> {
  using Elem = double;
};

// x = 2^k m with m in [1, 2), for a normal positive float x: returns m, sets k (as a float).
SSOD_HD float split_exponent(float x, float& k) {
  const uint32_t bits = float_to_bits(x);
  k = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  return bits_to_float(static_cast<int32_t>((bits & 0x007fffffu) | 0x3f800000u));
}

template <typename V>
using ElemOf = typename Lanes<V>::Elem;

// c ? a : b, for scalars.
template <typename T>
SSOD_HD T where(bool c, T a, T b) {
  return c ? a : b;
}

template <typename V>
SSOD_HD V max0(V x) {
  using T = ElemOf<V>;
  return where(x > T(0), x, T(0));
}

template <typename V>
SSOD_HD V abs_value(V x) {
  return where(x < ElemOf<V>(0), -x, x);
}

// exp(x) for x <= 0, float32 (V = float or a pack of floats). Below -87.3 (where float32 leaves the normal
// range) it returns 2^-126 instead of a denormal or zero, which no caller can tell apart from 0. (It is
// also exact for 0 < x < 88, though no caller needs that.)
template <typename V>
SSOD_HD V exp_nonpositive(V x) {
  // A flat select, not a branch, so the loops calling this if-convert (and vectorise).
  x = where(x < -87.3f, -87.3f, x);
  // x = n ln2 + r with |r| <= ln2 / 2; adding and subtracting 1.5 * 2^23 rounds to the nearest integer;
  // ln2 is split in two so that n * ln2_hi is exact.
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  // e^r = 1 + r + r^2 P(r), P the degree-5 minimax polynomial of the Cephes library (error ~1 ulp).
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V e_r = p * (r * r) + r + 1.0f;
  return Lanes<V>::times_pow2(e_r, n);  // e_r >= 1 when n = -126: the result is normal
}

// float64: the C library (a non-template overload, so it is the one picked for double).
SSOD_HD double exp_nonpositive(double x) {
  return exp(x);
}

// log(x) for a normal positive x, float32 (V = float or a pack of floats), within about one ulp: with
// x = 2^k m, m in [sqrt(1/2), sqrt(2)) and f = m - 1 (exact), log x = k ln2 + f - f^2 / 2 + f^3 P(f), P the
// degree-8 minimax polynomial of the Cephes library, ln2 split in two so that k ln2_hi is exact.
template <typename V>
SSOD_HD V log_positive(V x) {
  V k;
  const V m = split_exponent(x, k);  // in [1, 2)
  const auto high = m > 1.41421356f;
  const V f = where(high, m * 0.5f, m) - 1.0f;
  k = where(high, k + 1.0f, k);
  V p = f * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const V f2 = f * f;
  const V tail = (p * f * f2 + k * -2.12194440e-4f) - 0.5f * f2;
  return (f + tail) + k * 0.693359375f;
}

SSOD_HD double log_positive(double x) {
  return log(x);
}

SSOD_HD float exp_any(float x) {
  return expf(x);
}

SSOD_HD double exp_any(double x) {
  return exp(x);
}

SSOD_HD float log_any(float x) {
  return logf(x);
}

SSOD_HD double log_any(double x) {
  return log(x);
}

SSOD_HD float sqrt_any(float x) {
  return sqrtf(x);
}

SSOD_HD double sqrt_any(double x) {
  return sqrt(x);
}

// ---------------------------------------------------------------------------------------------------------
// ghm_kl: SED Eq. 5
// ---------------------------------------------------------------------------------------------------------

// 1 / a and 1 / b with one division (a, b in [1, 2], so a * b cannot overflow); divisions are the slowest
// vector instructions of these loops.
template <typename V>
SSOD_HD void two_reciprocals(V a, V b, V& inv_a, V& inv_b) {
  const V inv_ab = ElemOf<V>(1) / (a * b);
  inv_a = b * inv_ab;
  inv_b = a * inv_ab;
}

// The bin of a gradient norm g in [0, 1] among `bins` equal bins; g >= 1 goes to the last, and a NaN (from
// NaN logits) to the first, so that a diverged input gives a NaN loss, never an index outside the bins.
template <typename T>
SSOD_HD int32_t gradient_bin(T g, int32_t bins) {
  if (!(g < static_cast<T>(1))) return g >= static_cast<T>(1) ? bins - 1 : 0;  // g >= 1, or NaN
  const int32_t b = static_cast<int32_t>(g * static_cast<T>(bins));
  return b < bins - 1 ? b : bins - 1;
}

// log((1 + e_s) / (1 + e_t)) for e_s, e_t in (0, 1], given a = 1 + e_s and b = 1 + e_t, float32 (V = float
// or a pack of floats). The ratio lies in (1/2, 2], so with z = (a - b) / (a + b) in (-1/3, 1/3) it is
// 2 atanh(z) = 2z + 2z^3 Q(z^2): no range reduction, and z keeps full relative precision when e_s ~ e_t.
// Q is a degree-3 fit (relative error of the whole below 1.5e-8) written in w = (2z)^2.
template <typename V>
SSOD_HD V log_ratio(V es, V et, V a, V b) {
  using T = ElemOf<V>;
  const V z2 = (es - et) * (T(2) / (a + b));  // 2z
  const V w = z2 * z2;
  V q = w * T(5.4104858567e-04) + T(2.1916944025e-03);
  q = q * w + T(1.2506065204e-02);
  q = q * w + T(8.3333025429e-02);
  return (z2 * w) * q + z2;
}

// float64: the C library's log1p of (e_s - e_t) / (1 + e_t).
SSOD_HD double log_ratio(double es, double et, double a, double b) {
  return log1p((es - et) / b);
}

// The sigmoids p_s, p_t of a student logit s and a teacher logit t from e_s = exp(-|s|), e_t = exp(-|t|),
// and 1 / (1 + e_t).
template <typename V>
SSOD_HD void bernoulli_probs_of(V s, V t, V es, V et, V& rt, V& ps, V& pt) {
  using T = ElemOf<V>;
  V rs;
  two_reciprocals(es + T(1), et + T(1), rs, rt);  // 1 / (1 + e)
  ps = where(s >= T(0), rs, es * rs);  // sigmoid(s) without overflow
  pt = where(t >= T(0), rt, et * rt);
}

// Binary KL(teacher || student) of one element and its derivative d = dKL / ds = p_s - p_t (g = |d| is
// the gradient norm that picks its bin), given e_s = exp(-|s|) and e_t = exp(-|t|). With
// softplus(x) = max(x, 0) + log1p(e), log p = -softplus(-x) and log (1 - p) = -softplus(x):
//   KL = softplus(s) - softplus(t) + p_t (t - s) = softplus(-s) - softplus(-t) + (1 - p_t) (s - t),
// and softplus(s) - softplus(t) = max(s, 0) - max(t, 0) + L, L = log((1 + e_s) / (1 + e_t)). Taking the
// first form for t < 0 and the second for t >= 0 (so the probability multiplying s - t is the smaller one,
// m = e_t / (1 + e_t), and no large terms cancel), with u = s for t < 0 and u = -s for t >= 0:
//   KL = L + max(u, 0) - m (u + |t|).
template <typename V>
SSOD_HD void bernoulli_kl_of(V s, V t, V es, V et, V& kl, V& d) {
  using T = ElemOf<V>;
  V rt, ps, pt;
  bernoulli_probs_of(s, t, es, et, rt, ps, pt);
  d = ps - pt;
  const V m = et * rt;
  const V u = where(t >= T(0), -s, s);
  kl = log_ratio(es, et, es + T(1), et + T(1)) + max0(u) - m * (u + abs_value(t));
}

// The same from the logits alone.
template <typename V>
SSOD_HD void bernoulli_kl(V s, V t, V& kl, V& d) {
  bernoulli_kl_of(s, t, exp_nonpositive(-abs_value(s)), exp_nonpositive(-abs_value(t)), kl, d);
}

// dKL / ds of one element: p_s - p_t, exactly as bernoulli_kl forms it.
template <typename V>
SSOD_HD V bernoulli_kl_grad(V s, V t) {
  V rt, ps, pt;
  bernoulli_probs_of(s, t, exp_nonpositive(-abs_value(s)), exp_nonpositive(-abs_value(t)), rt, ps, pt);
  return ps - pt;
}

// Maximum m and normaliser z = sum_c exp(x_c - m) of one row of C logits (stride 1): the softmax is
// exp(x_c - m) / z and its log (x_c - m) - log z, formed as torch forms them.
template <typename T>
SSOD_HD void row_softmax_stats(const T* x, int64_t C, T& m, T& z) {
  T row_max = x[0];
  SSOD_SIMD_REDUCE(max, row_max)
  for (int64_t c = 1; c < C; ++c) row_max = x[c] > row_max ? x[c] : row_max;
  T sum = T(0);
  SSOD_SIMD_REDUCE(+, sum)
  for (int64_t c = 0; c < C; ++c) sum += exp_nonpositive(x[c] - row_max);
  m = row_max;
  z = sum;
}

// Per-row softmax constants: p_c = exp(x_c - max) * inv_z, log p_c = x_c - max - log_z.
template <typename T>
struct SoftmaxRow {
  T max, inv_z, log_z;
};

template <typename T>
SSOD_HD SoftmaxRow<T> softmax_row(const T* x, int64_t C) {
  T m, z;
  row_softmax_stats(x, C, m, z);
  return {m, T(1) / z, log_any(z)};
}

// One class's share of the C-way KL of a row and its derivative: from the logits s, t, their exp(x - max)
// es, et, and the constants of both rows, the KL summand p_t (log p_t - log p_s) and d = p_s - p_t
// (dKL / ds of this class; the row's gradient norm is half the sum of |d|). V is a scalar, or a pack of
// classes (of one row, or of several rows side by side with T a pack of their constants).
template <typename V, typename T>
SSOD_HD void softmax_kl_term(V s, V t, V es, V et, const SoftmaxRow<T>& rs, const SoftmaxRow<T>& rt, V& kl, V& d) {
  const V ps = es * rs.inv_z;
  const V pt = et * rt.inv_z;
  const V log_ps = (s - rs.max) - rs.log_z;
  const V log_pt = (t - rt.max) - rt.log_z;
  kl = pt * (log_pt - log_ps);
  d = ps - pt;
}

// C-way KL(teacher || student) of one row, g = 0.5 sum_c |p_s,c - p_t,c|, and the softmax constants of
// both rows; with d not null, also the row's dKL / ds, p_s,c - p_t,c, into d[0 .. C).
template <typename T>
SSOD_HD void softmax_kl_row(const T* s, const T* t, int64_t C, T& kl, T& g, SoftmaxRow<T>& rs, SoftmaxRow<T>& rt,
                            T* d = nullptr) {
  rs = softmax_row(s, C);
  rt = softmax_row(t, C);
  T acc_kl = T(0), acc_g = T(0);
  SSOD_SIMD_REDUCE(+, acc_kl, acc_g)
  for (int64_t c = 0; c < C; ++c) {
    T kl_c, d_c;
    softmax_kl_term(s[c], t[c], exp_nonpositive(s[c] - rs.max), exp_nonpositive(t[c] - rt.max), rs, rt, kl_c, d_c);
    if (d != nullptr) d[c] = d_c;
    acc_kl += kl_c;
    acc_g += abs_value(d_c);
  }
  kl = acc_kl;
  g = T(0.5) * acc_g;
}

// ---------------------------------------------------------------------------------------------------------
// jitter / refine: Soft Teacher Sec. 3.3
// ---------------------------------------------------------------------------------------------------------

// The side a coordinate moves along (w for x1, x2; h for y1, y2), clamped to >= 1.
template <typename T>
SSOD_HD T box_side(const T* box, int c) {
  const T side = (c % 2 == 0) ? box[2] - box[0] : box[3] - box[1];
  return side > T(1) ? side : T(1);
}

// Faster R-CNN decoding of deltas (dx, dy, dw, dh) against a box, xyxy out.
template <typename T>
SSOD_HD void decode_box(const T* delta, const T* box, const T* weights, T clip, T* out) {
  const T w = box[2] - box[0];
  const T h = box[3] - box[1];
  const T cx = box[0] + T(0.5) * w;
  const T cy = box[1] + T(0.5) * h;
  const T dx = delta[0] / weights[0];
  const T dy = delta[1] / weights[1];
  T dw = delta[2] / weights[2];
  T dh = delta[3] / weights[3];
  dw = dw < clip ? dw : clip;
  dh = dh < clip ? dh : clip;
  const T pcx = dx * w + cx;
  const T pcy = dy * h + cy;
  const T pw = exp_any(dw) * w;
  const T ph = exp_any(dh) * h;
  out[0] = pcx - T(0.5) * pw;
  out[1] = pcy - T(0.5) * ph;
  out[2] = pcx + T(0.5) * pw;
  out[3] = pcy + T(0.5) * ph;
}

// ---------------------------------------------------------------------------------------------------------
// frs_topk_mask: Dense Teacher Eq. 3-4
// ---------------------------------------------------------------------------------------------------------

// Unsigned keys whose order is the order of the floats (for non-NaN input); -0 and +0 share a key.
SSOD_HD uint32_t ordered_key(float x) {
  const uint32_t bits = float_to_bits(x + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

SSOD_HD uint64_t ordered_key(double x) {
  const uint64_t bits = double_to_bits(x + 0.0);
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}

template <typename V>
SSOD_HD V sigmoid(V x) {
  using T = ElemOf<V>;
  const V e = exp_nonpositive(-abs_value(x));
  const V r = T(1) / (e + T(1));
  return where(x >= T(0), r, e * r);
}

}  // namespace ssod
