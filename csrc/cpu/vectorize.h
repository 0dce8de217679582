// How the CPU kernels vectorise, and how they spread fixed blocks over threads (parallel_blocks).
//
// Two ways to vectorise, both compiled once per instruction set and picked at load time by the processor (GCC function
// multi-versioning), so one binary runs everywhere and uses AVX-512 or AVX2 where present:
//
// - Plain loops over contiguous arrays calling the inline math of ssod_math.h, marked `#pragma omp simd`
//   (built with -fopenmp; -fno-trapping-math lets the selects of that math be if-converted), in functions
//   marked SSOD_CPU_CLONES. Used where the auto-vectoriser does well (the float64 paths, simple loops).
// - Explicit vectors (the hot float32 loops): GCC vectors of W floats, where W is the register width of the
//   version (16 with AVX-512, 8 with AVX2, 4 otherwise), grouped U at a time into a simd::Pack. A kernel is
//   a template over <W, U> calling the templated per-element math of ssod_math.h with packs instead of
//   scalars, instantiated by SSOD_SIMD_VERSIONS once per instruction set. The remainder of an array shorter
//   than a pack goes through the same math with scalars.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>

#include "../ssod_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(SSOD_NO_CLONES)
#define SSOD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SSOD_MULTIVERSION 1
#else
#define SSOD_CPU_CLONES
#define SSOD_MULTIVERSION 0
#endif

#define SSOD_ALWAYS_INLINE inline __attribute__((always_inline))

// SSOD_SIMD_VERSIONS(ret, name, params, body, args): defines `ret name params`, one version per instruction
// set, each `return body<W, U> args;` with the lane count W of that set and the number U of vectors a pack
// holds (as many as the set's registers keep busy without spilling).
#if SSOD_MULTIVERSION
#define SSOD_SIMD_VERSIONS(ret, name, params, body, args)                                   \
  __attribute__((target("arch=x86-64-v4"))) ret name params { return body<16, 8> args; }   \
  __attribute__((target("arch=x86-64-v3"))) ret name params { return body<8, 4> args; }    \
  __attribute__((target("default"))) ret name params { return body<4, 4> args; }
#else
#if defined(__AVX512F__)
#define SSOD_SIMD_VERSIONS(ret, name, params, body, args) \
  ret name params { return body<16, 8> args; }
#elif defined(__AVX2__)
#define SSOD_SIMD_VERSIONS(ret, name, params, body, args) \
  ret name params { return body<8, 4> args; }
#else
#define SSOD_SIMD_VERSIONS(ret, name, params, body, args) \
  ret name params { return body<4, 4> args; }
#endif
#endif

namespace ssod {

// Runs fn(b) for every block b in [0, blocks) on up to at::get_num_threads() threads, each thread taking the
// next block not yet taken, so a thread that starts late or is preempted leaves its share to the others.
// fn(b) writes only block b's results, so the outcome depends on the blocks alone, never on the threads.
// Threads are only woken for at least `min_blocks` blocks each.
template <typename Fn>
void parallel_blocks(int64_t blocks, int64_t min_blocks, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks / std::max<int64_t>(min_blocks, 1));
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < blocks; ++b) fn(b);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(b);
    }
  });
}

namespace simd {

template <typename T, int W>
struct VectorOf {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};

// W float32 lanes, and W int32 lanes (the result type of comparing two float vectors: -1 true, 0 false).
template <int W>
using Float = typename VectorOf<float, W>::type;
template <int W>
using Int = typename VectorOf<int32_t, W>::type;

template <int W>
SSOD_ALWAYS_INLINE Float<W> load(const float* p) {
  Float<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
SSOD_ALWAYS_INLINE Int<W> load(const int32_t* p) {
  Int<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
SSOD_ALWAYS_INLINE void store(float* p, Float<W> v) {
  std::memcpy(p, &v, sizeof v);
}

template <int W>
SSOD_ALWAYS_INLINE void store(int32_t* p, Int<W> v) {
  std::memcpy(p, &v, sizeof v);
}

// A store that bypasses the caches (W = 8 or 16, p aligned to the vector), for large outputs written once
// and read back much later: it saves reading every line before writing it. Elsewhere a plain store. After
// a run of them, stream_fence() before the data is handed to another thread.
template <int W>
SSOD_ALWAYS_INLINE void stream(float* p, Float<W> v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (W == 16 || W == 8) {
    asm("vmovntps %1, %0" : "=m"(*reinterpret_cast<Float<W>*>(p)) : "v"(v));
    return;
  }
#endif
  store<W>(p, v);
}

inline void stream_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("sfence" ::: "memory");
#endif
}

// 0, 1, ..., W - 1.
template <int W>
SSOD_ALWAYS_INLINE Int<W> lane_index() {
  alignas(64) int32_t lanes[W];
  for (int l = 0; l < W; ++l) lanes[l] = l;
  return load<W>(lanes);
}

// Truncation toward zero (as static_cast<int32_t>), lane by lane.
template <int W>
SSOD_ALWAYS_INLINE Int<W> to_int(Float<W> x) {
  return __builtin_convertvector(x, Int<W>);
}

// The W/2 lanes starting at `first`.
template <int W, int First, int... I>
SSOD_ALWAYS_INLINE Float<W / 2> half_lanes(Float<W> x, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(x, x, (First + I)...);
}

// Sum and maximum of the lanes, by halving (a fixed order: the result depends only on W).
template <int W>
SSOD_ALWAYS_INLINE float add_lanes(Float<W> x) {
  if constexpr (W == 2) {
    return x[0] + x[1];
  } else {
    constexpr auto half = std::make_integer_sequence<int, W / 2>{};
    return add_lanes<W / 2>(half_lanes<W, 0>(x, half) + half_lanes<W, W / 2>(x, half));
  }
}

template <int W>
SSOD_ALWAYS_INLINE float max_lanes(Float<W> x) {
  if constexpr (W == 2) {
    return x[1] > x[0] ? x[1] : x[0];
  } else {
    constexpr auto half = std::make_integer_sequence<int, W / 2>{};
    const Float<W / 2> low = half_lanes<W, 0>(x, half), high = half_lanes<W, W / 2>(x, half);
    return max_lanes<W / 2>(high > low ? high : low);
  }
}

// In-place transpose of the W x W matrix whose rows are v[0 .. W): afterwards v[j] holds column j. log2(W)
// stages; stage k swaps, between vectors i and i + k (bit k of i clear), the lanes whose bit k differs.
template <int W, int K, bool kSecond>
struct TransposeStage {
  static constexpr std::array<int32_t, W> make() {
    std::array<int32_t, W> m{};
    for (int j = 0; j < W; ++j) {
      if (!kSecond) m[j] = (j & K) ? W + j - K : j;   // first of the pair: its own low lanes, the other's moved
      else m[j] = (j & K) ? W + j : j + K;            // second: the first's high lanes moved, its own high lanes
    }
    return m;
  }
  alignas(64) static constexpr std::array<int32_t, W> lanes = make();
};

template <int W, int K = 1>
SSOD_ALWAYS_INLINE void transpose(Float<W>* v) {
  if constexpr (K < W) {
    const Int<W> first = load<W>(TransposeStage<W, K, false>::lanes.data());
    const Int<W> second = load<W>(TransposeStage<W, K, true>::lanes.data());
    for (int i = 0; i < W; ++i) {
      if (i & K) continue;
      const Float<W> a = v[i], b = v[i + K];
      v[i] = __builtin_shuffle(a, b, first);
      v[i + K] = __builtin_shuffle(a, b, second);
    }
    transpose<W, K * 2>(v);
  }
}

// A pack of U vectors of W float lanes: the value type of the vector loops. Every operation is applied to
// the U vectors one after the other, so the processor always has U independent chains of instructions to
// overlap (the per-element math is one long dependent chain per vector). Comparisons give a Mask, and
// where(mask, a, b) selects lane by lane; either operand may be a float, broadcast to every lane.
template <int W, int U>
struct Pack {
  Float<W> v[U];
};

template <int W, int U>
struct Mask {
  Int<W> m[U];
};

template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> load_pack(const float* p) {
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) r.v[u] = load<W>(p + u * W);
  return r;
}

template <int W, int U>
SSOD_ALWAYS_INLINE void store_pack(float* p, const Pack<W, U>& x) {
  for (int u = 0; u < U; ++u) store<W>(p + u * W, x.v[u]);
}

// Lane access for the element-wise operations: a vector of a pack, or a float as it is.
template <int W, int U>
SSOD_ALWAYS_INLINE Float<W> part(const Pack<W, U>& x, int u) {
  return x.v[u];
}

template <int W, int U>
SSOD_ALWAYS_INLINE float part(float x, int) {
  return x;
}

#define SSOD_PACK_BINARY(op)                                                                              \
  template <int W, int U>                                                                                \
  SSOD_ALWAYS_INLINE Pack<W, U> operator op(const Pack<W, U>& a, const Pack<W, U>& b) {                 \
    Pack<W, U> r;                                                                                        \
    for (int u = 0; u < U; ++u) r.v[u] = a.v[u] op b.v[u];                                               \
    return r;                                                                                            \
  }                                                                                                      \
  template <int W, int U>                                                                                \
  SSOD_ALWAYS_INLINE Pack<W, U> operator op(const Pack<W, U>& a, float b) {                             \
    Pack<W, U> r;                                                                                        \
    for (int u = 0; u < U; ++u) r.v[u] = a.v[u] op b;                                                    \
    return r;                                                                                            \
  }                                                                                                      \
  template <int W, int U>                                                                                \
  SSOD_ALWAYS_INLINE Pack<W, U> operator op(float a, const Pack<W, U>& b) {                             \
    Pack<W, U> r;                                                                                        \
    for (int u = 0; u < U; ++u) r.v[u] = a op b.v[u];                                                    \
    return r;                                                                                            \
  }                                                                                                      \
  template <int W, int U>                                                                                \
  SSOD_ALWAYS_INLINE Pack<W, U>& operator op##=(Pack<W, U>& a, const Pack<W, U>& b) {                   \
    for (int u = 0; u < U; ++u) a.v[u] = a.v[u] op b.v[u];                                               \
    return a;                                                                                            \
  }
SSOD_PACK_BINARY(+)
SSOD_PACK_BINARY(-)
SSOD_PACK_BINARY(*)
SSOD_PACK_BINARY(/)
#undef SSOD_PACK_BINARY

#define SSOD_PACK_COMPARE(op)                                                                             \
  template <int W, int U>                                                                                \
  SSOD_ALWAYS_INLINE Mask<W, U> operator op(const Pack<W, U>& a, const Pack<W, U>& b) {                 \
    Mask<W, U> r;                                                                                        \
    for (int u = 0; u < U; ++u) r.m[u] = a.v[u] op b.v[u];                                               \
    return r;                                                                                            \
  }                                                                                                      \
  template <int W, int U>                                                                                \
  SSOD_ALWAYS_INLINE Mask<W, U> operator op(const Pack<W, U>& a, float b) {                             \
    Mask<W, U> r;                                                                                        \
    for (int u = 0; u < U; ++u) r.m[u] = a.v[u] op b;                                                    \
    return r;                                                                                            \
  }
SSOD_PACK_COMPARE(<)
SSOD_PACK_COMPARE(<=)
SSOD_PACK_COMPARE(>)
SSOD_PACK_COMPARE(>=)
#undef SSOD_PACK_COMPARE

template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> operator-(const Pack<W, U>& a) {
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) r.v[u] = -a.v[u];
  return r;
}

// where(c, a, b): a where c holds, b elsewhere; a and b each a pack or a float.
template <int W, int U, typename A, typename B>
SSOD_ALWAYS_INLINE Pack<W, U> where(const Mask<W, U>& c, const A& a, const B& b) {
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) r.v[u] = c.m[u] ? part<W, U>(a, u) : part<W, U>(b, u);
  return r;
}

// |x| by clearing the sign bit: one instruction, where the generic form takes three. (The result differs
// from x < 0 ? -x : x only for -0, and no caller can tell -0 from +0 after it.)
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> abs_value(const Pack<W, U>& x) {
  Pack<W, U> r;
  for (int u = 0; u < U; ++u) r.v[u] = reinterpret_cast<Float<W>>(reinterpret_cast<Int<W>>(x.v[u]) & 0x7fffffff);
  return r;
}

// split_exponent of ssod_math.h for packs: x = 2^k m, m in [1, 2), lane by lane (normal positive x).
template <int W, int U>
SSOD_ALWAYS_INLINE Pack<W, U> split_exponent(const Pack<W, U>& x, Pack<W, U>& k) {
  Pack<W, U> m;
  for (int u = 0; u < U; ++u) {
    const Int<W> bits = reinterpret_cast<Int<W>>(x.v[u]);
    k.v[u] = __builtin_convertvector(((bits >> 23) & 0xff) - 127, Float<W>);
    m.v[u] = reinterpret_cast<Float<W>>((bits & 0x007fffff) | 0x3f800000);
  }
  return m;
}

}  // namespace simd

// The bit-level step of ssod_math.h's float32 exp for packs: 2^n from integral n in [-126, 127], per lane,
// and x 2^n (exact for a normal result). With AVX-512 (W = 16) the latter is one instruction, vscalefps,
// written as inline assembly: the intrinsic cannot be called from this template, which is compiled for
// every instruction set and only instantiated with W = 16 inside the AVX-512 versions.
template <int W, int U>
struct Lanes<simd::Pack<W, U>> {
  using Elem = float;
  static SSOD_ALWAYS_INLINE simd::Pack<W, U> pow2(const simd::Pack<W, U>& n) {
    simd::Pack<W, U> r;
    for (int u = 0; u < U; ++u) {
      r.v[u] = reinterpret_cast<simd::Float<W>>((simd::to_int<W>(n.v[u]) + 127) << 23);
    }
    return r;
  }

  static SSOD_ALWAYS_INLINE simd::Pack<W, U> times_pow2(const simd::Pack<W, U>& x, const simd::Pack<W, U>& n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (W == 16) {
      simd::Pack<W, U> r;
      for (int u = 0; u < U; ++u) asm("vscalefps %2, %1, %0" : "=v"(r.v[u]) : "v"(x.v[u]), "v"(n.v[u]));
      return r;
    }
#endif
    return x * pow2(n);
  }
};

}  // namespace ssod
