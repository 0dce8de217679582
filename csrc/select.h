// Exact top-k threshold by radix selection over ordered integer keys (no sort), shared by the CPU kernel
// and, for its host-side steps, documentation of the CUDA one.
//
// The k-th largest key is found digit by digit from the most significant: a histogram of the current digit
// over the candidates that share the prefix chosen so far tells which digit value holds the k-th key, and
// how many of the k lie strictly above it. After the last digit the prefix is the threshold key T; the
// rows with key > T are all selected, and the remaining k - #(key > T) are taken among the rows with
// key == T in index order (ties go to the lower index).
#pragma once

#include <cstdint>

namespace ssod {

// Walk a histogram of `size` digit values from the top. `remaining` is how many keys are still wanted among
// the candidates; returns the digit value that holds the remaining-th largest and lowers `remaining` by the
// number of candidates above it.
template <typename Count>
inline int64_t pick_digit(const Count* hist, int64_t size, int64_t& remaining) {
  for (int64_t d = size - 1; d > 0; --d) {
    if (static_cast<int64_t>(hist[d]) >= remaining) return d;
    remaining -= static_cast<int64_t>(hist[d]);
  }
  return 0;
}

}  // namespace ssod
