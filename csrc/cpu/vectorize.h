// How the CPU kernels vectorise. The inner loops are plain loops over contiguous arrays calling the inline
// math of ssod_math.h, marked `#pragma omp simd` (built with -fopenmp; -fno-trapping-math lets the
// selects of that math be if-converted). The functions that hold them are
// compiled once per instruction set and picked at load time by the processor (GCC function
// multi-versioning), so one binary runs everywhere and uses AVX-512 or AVX2 where present.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(SSOD_NO_CLONES)
#define SSOD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSOD_CPU_CLONES
#endif

#define SSOD_ALWAYS_INLINE inline __attribute__((always_inline))
