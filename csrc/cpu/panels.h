// Pieces of the panel-plan CPU kernels shared by the matmul (matmul_panels.cpp) and the
// convolution (conv_panels.cpp): per-task scratch, the plan
// check fused into the kernels' segment loops, and the inner loop that adds one (panel, row)
// segment of W times a batch-contiguous slice of operands.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cpu_isa.h"
#include "half_as_float.h"
#include "matmul.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define DYNASPARSE_X86 1
#include <immintrin.h>
#endif

namespace dynasparse {

inline uint16_t col_offset(int16_t col) { return static_cast<uint16_t>(col); }

// The accumulator of the portable loops, whose sums run in one chain (a product's over K, an
// SDDMM's over the batch and every output pixel): double for fp32, whose float chain had 5x
// torch's blocked error over 301 terms and 3.6x over 1,280; the opmath type (float for half
// types, double for double) otherwise.
template <typename scalar_t>
using long_sum_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

// 16-float vectors per slice row for `batch` rows: 64-row slices unless the batch is small.
inline int vectors_for(int64_t batch) { return batch > 32 ? 4 : batch > 16 ? 2 : 1; }

// A plan's values checked inside the kernels that use it (csrc/matmul.h says why). Before a
// kernel reads through a (panel, row) segment it checks that 0 <= begin <= end <= nnz and
// that the segment's column offsets ascend below the panel's width; with row_ptr's ends
// checked up front, every segment passing is exactly check_panel_plan_values passing. A
// separate pass would read the whole plan once more (a pre-pass per group of rows cost twice
// as much: it pushes the operand slice out of L1); in the kernel's own segment loop
// the check reads what the kernel is about to read anyway, once per call (on the first batch
// slice or task, not again for the others): 3.5-5% of the batch-32 forward at 90% sparsity,
// single-threaded. A segment that fails ends its task (fail()); finish() then runs the full
// check, which throws the first violation with the message every backend gives.
class PanelPlanCheck {
 public:
  PanelPlanCheck(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols, int64_t panel, int64_t n,
                 int64_t k)
      : op_(op), row_ptr_(row_ptr.const_data_ptr<int64_t>()), cols_(cols.const_data_ptr<int16_t>()),
        nnz_(cols.numel()), panel_(panel), n_(n), k_(k) {
    if (row_ptr_[0] != 0 || row_ptr_[panel_count(k, panel) * n] != nnz_) report();
  }

  const int64_t* row_ptr() const { return row_ptr_; }
  const int16_t* cols() const { return cols_; }
  int64_t nnz() const { return nnz_; }
  int64_t n() const { return n_; }
  int64_t panels() const { return panel_count(k_, panel_); }
  int64_t width(int64_t p) const { return panel_width(p, panel_, k_); }
  // Every segment of rows [row_begin, row_end), for kernels whose loop over a segment's
  // nonzeros is too tight to hold a check (packing and unpacking: a load and a store per
  // nonzero, where a compare per nonzero measured 10-15%).
  bool rows_ok(int64_t row_begin, int64_t row_end) const;
  void fail() { failed_.store(true, std::memory_order_relaxed); }
  // After the kernels; an op whose kernels visit no segment (an empty batch) runs all().
  void finish() const {
    if (failed_.load(std::memory_order_relaxed)) report();
  }
  void all() const { check_panel_plan_values(op_, row_ptr_, cols_, nnz_, panel_, n_, k_); }

 private:
  [[noreturn]] void report() const {
    all();
    TORCH_INTERNAL_ASSERT(false, "dynasparse.", op_, ": a plan segment failed its check, the whole plan passed");
  }

  const char* op_;
  const int64_t* row_ptr_;
  const int16_t* cols_;
  int64_t nnz_, panel_, n_, k_;
  std::atomic<bool> failed_{false};
};

// Unsigned compares: a negative begin or end fails them too.
inline bool segment_bounds_ok(int64_t begin, int64_t end, int64_t nnz) {
  return static_cast<uint64_t>(begin) <= static_cast<uint64_t>(end) &&
         static_cast<uint64_t>(end) <= static_cast<uint64_t>(nnz);
}

inline bool segment_ok_scalar(const int16_t* cols, int64_t begin, int64_t end, int64_t nnz, int64_t width) {
  if (!segment_bounds_ok(begin, end, nnz)) return false;
  int64_t previous = -1;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t offset = col_offset(cols[i]);
    if (offset >= width || offset <= previous) return false;
    previous = offset;
  }
  return true;
}

// 64-byte aligned float scratch owned by one parallel task.
struct Scratch {
  explicit Scratch(int64_t floats) : data(static_cast<float*>(c10::alloc_cpu(std::max<int64_t>(floats, 1) * 4))) {}
  ~Scratch() { c10::free_cpu(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data;
};

// Defines name<N>(f): f(std::integral_constant<int, I>{}) for I = 0 .. N - 1, as straight-line
// code. Defined inside each instruction set's target region: GCC inlines a call only into a
// caller whose target includes the callee's, and the lambdas passed in carry their caller's
// target, so with one definition outside the regions they stayed out-of-line calls (objdump).
#define DYNASPARSE_DEFINE_UNROLL(name)                                                           \
  template <int N, typename F>                                                                   \
  __attribute__((always_inline)) inline void name(F&& f) {                                       \
    [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }( \
        std::make_integer_sequence<int, N>{});                                                   \
  }

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")

DYNASPARSE_DEFINE_UNROLL(unroll)

// Rows [r0, r1) of one panel, 8 per step: 0 <= segment[r0] <= ... <= segment[r1] <= nnz.
// The kernels that walk a group of rows check their bounds this way before the group, and
// then each segment's offsets.
__attribute__((always_inline)) inline bool rows_bounds_ok_avx512(const int64_t* segment, int64_t r0, int64_t r1,
                                                                  int64_t nnz) {
  const __m512i total = _mm512_set1_epi64(nnz);
  __mmask8 bad = 0;
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8) {
    const __m512i begin = _mm512_loadu_si512(segment + r), end = _mm512_loadu_si512(segment + r + 1);
    bad |= _mm512_cmpgt_epu64_mask(begin, end) | _mm512_cmpgt_epu64_mask(end, total);
  }
  const __mmask8 lanes = static_cast<__mmask8>(_bzhi_u32(0xFF, static_cast<unsigned>(r1 - r)));
  const __m512i begin = _mm512_maskz_loadu_epi64(lanes, segment + r);
  const __m512i end = _mm512_maskz_loadu_epi64(lanes, segment + r + 1);
  bad |= _mm512_mask_cmpgt_epu64_mask(lanes, begin, end) | _mm512_mask_cmpgt_epu64_mask(lanes, end, total);
  return bad == 0;
}

// The offsets of a segment whose bounds passed, 32 per vector. Most segments hold at most 32
// nonzeros (panel 256 at 90% sparsity and above): one masked load, the predecessors by an
// in-register shift, no loop (a loop's data-dependent exit mispredicts; that version cost
// about twice as much). Longer segments loop, loading each vector's predecessors one element
// back.
__attribute__((always_inline)) inline bool segment_offsets_ok_avx512(const int16_t* cols, int64_t begin, int64_t end,
                                                                      int64_t width) {
  // width is in [1, 65536], so width - 1 fits 16 unsigned bits.
  const __m512i last = _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(width - 1)));
  if (end - begin > 32) {
    for (int64_t i = begin; i < end; i += 32) {
      const auto count = static_cast<unsigned>(std::min<int64_t>(32, end - i));
      const __mmask32 lanes = _bzhi_u32(~0u, count);
      const __mmask32 follows = i == begin ? _bzhi_u32(~1u, count) : lanes;
      const __m512i offsets = _mm512_maskz_loadu_epi16(lanes, cols + i);
      const __m512i previous = _mm512_maskz_loadu_epi16(follows, cols + i - 1);
      if (!_kortestz_mask32_u8(_mm512_mask_cmpgt_epu16_mask(lanes, offsets, last),
                               _mm512_mask_cmple_epu16_mask(follows, offsets, previous))) {
        return false;
      }
    }
    return true;
  }
  const auto count = static_cast<unsigned>(end - begin);
  const __mmask32 lanes = _bzhi_u32(~0u, count);
  const __m512i offsets = _mm512_maskz_loadu_epi16(lanes, cols + begin);
  // Lane j of `previous` is lane j - 1 of `offsets`; lane 0 has no predecessor (not compared).
  const __m512i down = _mm512_set_epi16(30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
                                        10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0);
  const __m512i previous = _mm512_permutexvar_epi16(down, offsets);
  return _kortestz_mask32_u8(_mm512_mask_cmpgt_epu16_mask(lanes, offsets, last),
                             _mm512_mask_cmple_epu16_mask(_bzhi_u32(~1u, count), offsets, previous));
}

inline bool rows_ok_avx512(const PanelPlanCheck& check, int64_t row_begin, int64_t row_end) {
  for (int64_t p = 0; p < check.panels(); ++p) {
    const int64_t* segment = check.row_ptr() + p * check.n();
    const int64_t width = check.width(p);
    if (!rows_bounds_ok_avx512(segment, row_begin, row_end, check.nnz())) return false;
    for (int64_t row = row_begin; row < row_end; ++row) {
      if (!segment_offsets_ok_avx512(check.cols(), segment[row], segment[row + 1], width)) return false;
    }
  }
  return true;
}

// out[0, 16 * kVecs) += sum over nonzeros [i, end) of values[i] * x_panel[cols[i]] (slice
// rows of 16 * kVecs floats). kSets independent accumulator sets split the nonzeros
// (even/odd, ...) so that eight FMA chains are in flight; they are summed pairwise in a fixed
// order, so the result depends on the plan alone. The accumulators are indexed by constants
// (unroll, not loops): indexed by loop counters, even fully unrolled ones, GCC 12 keeps them in
// a stack array and stores all of them on every iteration, which made the batch-32 forward
// about 1.4x slower (measured).
template <int kVecs>
__attribute__((always_inline)) inline void add_segment_avx512(const float* values, const int16_t* cols, int64_t i,
                                                               int64_t end, const float* x_panel, float* out) {
  constexpr int kWidth = 16 * kVecs;
  constexpr int kSets = 8 / kVecs;
  __m512 acc[kSets][kVecs];
  // Every set starts at zero and the segment's sum joins `out` at the end: seeding set 0 with
  // `out` made one FMA chain over all of K where segments are short (small panels, dense rows),
  // an error several times torch's.
  unroll<kSets>([&](auto s) { unroll<kVecs>([&](auto v) { acc[s][v] = _mm512_setzero_ps(); }); });
  // The nonzeros past a multiple of kSets first, into set 0.
  const int64_t whole = end - (end - i) % kSets;
  for (int64_t tail = whole; tail < end; ++tail) {
    const __m512 value = _mm512_set1_ps(values[tail]);
    const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[tail])) * kWidth;
    unroll<kVecs>([&](auto v) { acc[0][v] = _mm512_fmadd_ps(value, _mm512_loadu_ps(x_col + 16 * v), acc[0][v]); });
  }
  for (; i < whole; i += kSets) {
    unroll<kSets>([&](auto s) {
      const __m512 value = _mm512_set1_ps(values[i + s]);
      const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[i + s])) * kWidth;
      unroll<kVecs>([&](auto v) { acc[s][v] = _mm512_fmadd_ps(value, _mm512_loadu_ps(x_col + 16 * v), acc[s][v]); });
    });
  }
  // Pairwise: strides 1, 2, 4 (kSets is at most 8), set s absorbing set s + stride.
  unroll<kVecs>([&](auto v) {
    unroll<3>([&](auto t) {
      constexpr int stride = 1 << t;
      unroll<kSets>([&](auto s) {
        if constexpr (s % (2 * stride) == 0 && s + stride < kSets) {
          acc[s][v] = _mm512_add_ps(acc[s][v], acc[s + stride][v]);
        }
      });
    });
    _mm512_storeu_ps(out + 16 * v, _mm512_add_ps(_mm512_loadu_ps(out + 16 * v), acc[0][v]));
  });
}

#pragma GCC pop_options
#endif  // DYNASPARSE_X86

inline bool PanelPlanCheck::rows_ok(int64_t row_begin, int64_t row_end) const {
#if DYNASPARSE_X86
  if (has_avx512()) return rows_ok_avx512(*this, row_begin, row_end);
#endif
  for (int64_t p = 0; p < panels(); ++p) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      if (!segment_ok_scalar(cols_, row_ptr_[p * n_ + row], row_ptr_[p * n_ + row + 1], nnz_, width(p))) return false;
    }
  }
  return true;
}

}  // namespace dynasparse
