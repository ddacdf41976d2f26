// Pieces of the panel-plan CPU kernels shared by the matmul (matmul_panels.cpp) and the
// convolution (conv_panels.cpp): run-time AVX-512 detection, per-task scratch, and the inner
// loop that adds one (panel, row) segment of W times a batch-contiguous slice of operands.
#pragma once

#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#define DYNASPARSE_X86 1
#include <immintrin.h>
#endif

namespace dynasparse {

// Selected at run time, so the build needs no -march flag.
inline bool has_avx512() {
#if DYNASPARSE_X86
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return supported;
#else
  return false;
#endif
}

inline uint16_t col_offset(int16_t col) { return static_cast<uint16_t>(col); }

// 16-float vectors per slice row for `batch` rows: 64-row slices unless the batch is small.
inline int vectors_for(int64_t batch) { return batch > 32 ? 4 : batch > 16 ? 2 : 1; }

// 64-byte aligned float scratch owned by one parallel task.
struct Scratch {
  explicit Scratch(int64_t floats) : data(static_cast<float*>(c10::alloc_cpu(std::max<int64_t>(floats, 1) * 4))) {}
  ~Scratch() { c10::free_cpu(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data;
};

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// out[0, 16 * kVecs) += sum over nonzeros [i, end) of values[i] * x_panel[cols[i]] (slice
// rows of 16 * kVecs floats). kSets independent accumulator sets split the nonzeros
// (even/odd, ...) so that eight FMA chains are in flight; they are summed pairwise in a fixed
// order, so the result depends on the plan alone.
template <int kVecs>
__attribute__((always_inline)) inline void add_segment_avx512(const float* values, const int16_t* cols, int64_t i,
                                                               int64_t end, const float* x_panel, float* out) {
  constexpr int kWidth = 16 * kVecs;
  constexpr int kSets = 8 / kVecs;
  __m512 acc[kSets][kVecs];
#pragma GCC unroll 8
  for (int s = 0; s < kSets; ++s) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[s][v] = s == 0 ? _mm512_loadu_ps(out + 16 * v) : _mm512_setzero_ps();
  }
  // The nonzeros past a multiple of kSets first: with the remainder loop after the main one,
  // GCC keeps accumulators on the stack and stores them on every main-loop iteration.
  const int64_t whole = end - (end - i) % kSets;
  for (int64_t tail = whole; tail < end; ++tail) {
    const __m512 value = _mm512_set1_ps(values[tail]);
    const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[tail])) * kWidth;
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[0][v] = _mm512_fmadd_ps(value, _mm512_loadu_ps(x_col + 16 * v), acc[0][v]);
  }
  for (; i < whole; i += kSets) {
#pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
      const __m512 value = _mm512_set1_ps(values[i + s]);
      const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[i + s])) * kWidth;
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[s][v] = _mm512_fmadd_ps(value, _mm512_loadu_ps(x_col + 16 * v), acc[s][v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
#pragma GCC unroll 8
    for (int stride = 1; stride < kSets; stride *= 2) {
#pragma GCC unroll 8
      for (int s = 0; s + stride < kSets; s += 2 * stride) acc[s][v] = _mm512_add_ps(acc[s][v], acc[s + stride][v]);
    }
    _mm512_storeu_ps(out + 16 * v, acc[0][v]);
  }
}

#pragma GCC pop_options
#endif  // DYNASPARSE_X86

}  // namespace dynasparse
