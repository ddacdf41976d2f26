// CPU kernels of the masked matmul's panel plan (layout in csrc/ops.cpp): plan building, value
// packing, y = x @ W.T and the masked weight gradient.
//
// fp32 (and widened half-precision) products run AVX-512 kernels, or AVX2 ones on x86 CPUs
// without AVX-512 (cpu_isa.h); other dtypes, and other CPUs, run a scalar kernel accumulating
// in float (half types) or the dtype itself. Every output element is summed in an order fixed
// by the plan, the batch size and the instruction set alone, so results do not depend on the
// thread count.
//
// The batched fp32 kernels read x (and grad_out) transposed into batch-contiguous slices of
// 16, 32 or 64 rows (AVX2: 8, 16 or 32): slice[c][b] = x[b0 + b, c]. One panel of a slice
// (panel * 256 bytes at 64 rows) stays in L1/L2 while every row of W visits it, so each
// nonzero is one broadcast value times up to four cached vectors, and each (panel, row)
// segment costs a load and a store of its accumulators. Panel 256 (64 KiB of slice) is the best width measured for 80-98%
// sparsity: 128 doubles the per-segment cost (B=1 and high sparsity suffer most), 512 and
// wider push the slice out of L2's fast reach at moderate sparsity (2x slower at 50%).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "matmul.h"
#include "panels.h"
#include "parallel.h"

namespace dynasparse {
namespace {

// Rows of W per parallel task: enough work per task to hide the fork, few enough to balance.
constexpr int64_t kRowGrain = 16;

// Rows of W per task of a product (or SDDMM) over `batch` rows of x: kRowGrain, or more where
// the whole product is too little work to wake a helper (parallel.h).
inline int64_t product_row_grain(const PanelPlanCheck& check, int64_t batch) {
  return work_grain(check.n(), check.nnz() * batch, kRowGrain);
}

// x (..., K) as [rows, K]: a view where the strides allow (no -1: K may be 0).
at::Tensor as_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return x.reshape({rows, x.size(-1)});
}

// ---------------------------------------------------------------------------------------------
// Plan building: a count pass and a fill pass over the rows, with a prefix sum between them.

// Bits of up to 64 bool bytes (each 0 or 1), byte i at bit i.
inline uint64_t byte_bits_scalar(const uint8_t* bytes, int64_t count) {
  uint64_t bits = 0;
  for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(bytes[i]) << i;
  return bits;
}

#if DYNASPARSE_X86
__attribute__((target("avx512f,avx512bw"))) inline uint64_t byte_bits_avx512(const uint8_t* bytes,
                                                                                int64_t count) {
  const __mmask64 lanes = count >= 64 ? ~__mmask64(0) : (__mmask64(1) << count) - 1;
  const __m512i loaded = _mm512_maskz_loadu_epi8(lanes, bytes);
  return _mm512_test_epi8_mask(loaded, loaded);
}
#endif

// Calls visit(bits, first_column) for each 64-column word of mask row [begin, end).
template <bool kAvx512, typename Visit>
inline void for_each_word(const uint8_t* row, int64_t begin, int64_t end, const Visit& visit) {
  for (int64_t c = begin; c < end; c += 64) {
    const int64_t count = std::min<int64_t>(64, end - c);
    uint64_t bits;
#if DYNASPARSE_X86
    if constexpr (kAvx512) {
      bits = byte_bits_avx512(row + c, count);
    } else {
      bits = byte_bits_scalar(row + c, count);
    }
#else
    bits = byte_bits_scalar(row + c, count);
#endif
    visit(bits, c);
  }
}

// Fills row_ptr, returns the number of nonzeros.
template <bool kAvx512>
int64_t count_plan(const uint8_t* mask, int64_t n, int64_t k, int64_t panel, int64_t* row_ptr) {
  const int64_t panels = panel_count(k, panel);
  // Pass 1: row_ptr[1 + p * n + row] = nonzeros of row inside panel p.
  row_ptr[0] = 0;
  parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t p = 0; p < panels; ++p) {
        int64_t count = 0;
        for_each_word<kAvx512>(mask + row * k, p * panel, std::min(k, (p + 1) * panel),
                               [&](uint64_t bits, int64_t) { count += __builtin_popcountll(bits); });
        row_ptr[1 + p * n + row] = count;
      }
    }
  });
  int64_t running = 0;
  for (int64_t s = 1; s <= panels * n; ++s) {
    running += row_ptr[s];
    row_ptr[s] = running;
  }
  return running;
}

template <bool kAvx512>
void fill_plan(const uint8_t* mask, int64_t n, int64_t k, int64_t panel, const int64_t* row_ptr, int16_t* cols) {
  const int64_t panels = panel_count(k, panel);
  parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t p = 0; p < panels; ++p) {
        int16_t* out = cols + row_ptr[p * n + row];
        const int64_t base = p * panel;
        for_each_word<kAvx512>(mask + row * k, base, std::min(k, base + panel), [&](uint64_t bits, int64_t first) {
          const auto offset = static_cast<uint16_t>(first - base);
          while (bits) {
            *out++ = static_cast<int16_t>(static_cast<uint16_t>(offset + __builtin_ctzll(bits)));
            bits &= bits - 1;
          }
        });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> plan_panels_cpu(const at::Tensor& mask_in, int64_t panel) {
  check_plan_panels(mask_in, panel);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t n = mask.size(0), k = mask.size(1);
  at::Tensor row_ptr = at::empty({panel_count(k, panel) * n + 1}, mask.options().dtype(at::kLong));
  const auto* bytes = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const bool avx512 = has_avx512();
  const int64_t nonzeros = avx512 ? count_plan<true>(bytes, n, k, panel, row_ptr.data_ptr<int64_t>())
                                  : count_plan<false>(bytes, n, k, panel, row_ptr.data_ptr<int64_t>());
  at::Tensor cols = at::empty({nonzeros}, mask.options().dtype(at::kShort));
  if (nonzeros > 0) {
    if (avx512) {
      fill_plan<true>(bytes, n, k, panel, row_ptr.data_ptr<int64_t>(), cols.data_ptr<int16_t>());
    } else {
      fill_plan<false>(bytes, n, k, panel, row_ptr.data_ptr<int64_t>(), cols.data_ptr<int16_t>());
    }
  }
  return {row_ptr, cols};
}

// ---------------------------------------------------------------------------------------------
// Packing and unpacking. Rows are visited in blocks, panel by panel inside a block: for a
// transposed weight (w.T, stride (1, K)) the block's rows are adjacent in memory, so one panel
// of a block touches panel cache lines instead of panel * block.

constexpr int64_t kPackRows = 16;

// start_rows(row_begin, row_end) runs before a block's nonzeros are visited, and after the
// plan check of its segments.
template <typename Visit, typename StartRows>
void for_each_nonzero(PanelPlanCheck& check, const int64_t* row_ptr, const int16_t* cols, int64_t n, int64_t panels,
                      int64_t panel, const Visit& visit, const StartRows& start_rows) {
  const int64_t blocks = ceil_div(n, kPackRows);
  parallel_for(0, blocks, work_grain(blocks, check.nnz(), 1), [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row_end = std::min(n, (block + 1) * kPackRows);
      if (!check.rows_ok(block * kPackRows, row_end)) return check.fail();
      start_rows(block * kPackRows, row_end);
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t row = block * kPackRows; row < row_end; ++row) {
          for (int64_t i = row_ptr[p * n + row]; i < row_ptr[p * n + row + 1]; ++i) {
            visit(i, row, p * panel + col_offset(cols[i]));
          }
        }
      }
    }
  });
  check.finish();
}

at::Tensor pack_panels_cpu(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& cols,
                           int64_t panel) {
  check_pack_panels(weight, row_ptr, cols, panel);
  const int64_t n = weight.size(0), k = weight.size(1);
  PanelPlanCheck check("pack_panels", row_ptr, cols, panel, n, k);
  at::Tensor values = at::empty({cols.numel()}, weight.options());
  if (cols.numel() == 0) {
    check.all();
    return values;
  }
  const int64_t row_stride = weight.stride(0), col_stride = weight.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "pack_panels", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* out = values.data_ptr<scalar_t>();
    for_each_nonzero(check, row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int16_t>(), n, panel_count(k, panel),
                     panel, [&](int64_t i, int64_t row, int64_t col) { out[i] = w[row * row_stride + col * col_stride]; },
                     [](int64_t, int64_t) {});
  });
  return values;
}

at::Tensor unpack_panels_cpu(const at::Tensor& values_in, const at::Tensor& row_ptr, const at::Tensor& cols,
                             int64_t panel, int64_t n, int64_t k) {
  check_unpack_panels(values_in, row_ptr, cols, panel, n, k);
  PanelPlanCheck check("unpack_panels", row_ptr, cols, panel, n, k);
  const at::Tensor values = values_in.contiguous();
  // Each block of rows is zeroed right before its values land, while it is in cache: one pass
  // over the dense output instead of a zero fill and then a scatter.
  at::Tensor dense = at::empty({n, k}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "unpack_panels", [&] {
    const scalar_t* in = values.const_data_ptr<scalar_t>();
    scalar_t* out = dense.data_ptr<scalar_t>();
    for_each_nonzero(check, row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int16_t>(), n,
                     panel_count(k, panel), panel,
                     [&](int64_t i, int64_t row, int64_t col) { out[row * k + col] = in[i]; },
                     [&](int64_t row_begin, int64_t row_end) {
                       std::fill(out + row_begin * k, out + row_end * k, scalar_t(0));
                     });
  });
  return dense;
}

// ---------------------------------------------------------------------------------------------
// Generic products (any dtype, any CPU): one output element at a time, panels in order.

template <typename scalar_t>
void spmm_generic(PanelPlanCheck& check, const at::Tensor& x, const scalar_t* values, const int64_t* row_ptr,
                  const int16_t* cols, int64_t panel, int64_t n, const scalar_t* bias, scalar_t* y) {
  using acc_t = long_sum_t<scalar_t>;
  const int64_t batch = x.size(0), k = x.size(1), panels = panel_count(k, panel);
  const int64_t batch_stride = x.stride(0), col_stride = x.stride(1);
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      // Once per row, not once per batch row.
      for (int64_t p = 0; p < panels; ++p) {
        if (!segment_ok_scalar(cols, row_ptr[p * n + row], row_ptr[p * n + row + 1], check.nnz(), check.width(p))) {
          return check.fail();
        }
      }
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* x_row = xs + b * batch_stride;
        acc_t acc = 0;
        for (int64_t p = 0; p < panels; ++p) {
          for (int64_t i = row_ptr[p * n + row]; i < row_ptr[p * n + row + 1]; ++i) {
            acc += static_cast<acc_t>(values[i]) *
                   static_cast<acc_t>(x_row[(p * panel + col_offset(cols[i])) * col_stride]);
          }
        }
        if (bias != nullptr) acc += static_cast<acc_t>(bias[row]);
        y[b * n + row] = static_cast<scalar_t>(acc);
      }
    }
  });
}

template <typename scalar_t>
void sddmm_generic(PanelPlanCheck& check, const at::Tensor& grad_out, const at::Tensor& x, const int64_t* row_ptr,
                   const int16_t* cols, int64_t panel, scalar_t* values) {
  using acc_t = long_sum_t<scalar_t>;
  const int64_t batch = x.size(0), k = x.size(1), n = grad_out.size(1), panels = panel_count(k, panel);
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const int64_t g_batch = grad_out.stride(0), g_col = grad_out.stride(1);
  const int64_t x_batch = x.stride(0), x_col = x.stride(1);
  parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t p = 0; p < panels; ++p) {
        if (!segment_ok_scalar(cols, row_ptr[p * n + row], row_ptr[p * n + row + 1], check.nnz(), check.width(p))) {
          return check.fail();
        }
        for (int64_t i = row_ptr[p * n + row]; i < row_ptr[p * n + row + 1]; ++i) {
          const int64_t col = p * panel + col_offset(cols[i]);
          acc_t acc = 0;
          for (int64_t b = 0; b < batch; ++b) {
            acc += static_cast<acc_t>(g[b * g_batch + row * g_col]) * static_cast<acc_t>(xs[b * x_batch + col * x_col]);
          }
          values[i] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Pieces of the fp32 products of every instruction set.

// m [batch, cols] (any strides) -> ceil(batch / width) slices of [cols][width], zero past batch.
at::Tensor batch_slices(const at::Tensor& m, int64_t width) {
  const int64_t batch = m.size(0), cols = m.size(1), slices = ceil_div(batch, width);
  at::Tensor out = at::empty({slices, cols, width}, m.options());
  if (out.numel() == 0) return out;
  const float* in = m.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t batch_stride = m.stride(0), col_stride = m.stride(1);
  constexpr int64_t kBlock = 64;
  const int64_t col_blocks = ceil_div(cols, kBlock);
  const int64_t tasks = slices * col_blocks;
  parallel_for(0, tasks, work_grain(tasks, out.numel(), 1), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slice = task / col_blocks, c0 = (task % col_blocks) * kBlock;
      const int64_t c1 = std::min(cols, c0 + kBlock);
      float* block = dst + (slice * cols + c0) * width;
      for (int64_t b = 0; b < width; ++b) {
        const int64_t source = slice * width + b;
        if (source < batch) {
          const float* row = in + source * batch_stride;
          for (int64_t c = c0; c < c1; ++c) block[(c - c0) * width + b] = row[c * col_stride];
        } else {
          for (int64_t c = c0; c < c1; ++c) block[(c - c0) * width + b] = 0.0f;
        }
      }
    }
  });
  return out;
}

// Rows of W per inner group: the group's accumulators ([rows][width] floats, 128 KiB at
// width 64) stay in L2 while every panel of a slice passes over them.
constexpr int64_t kGroupRows = 512;

// Panels summed into a fresh accumulator before joining the running total: where panels are
// narrow (or K long), one accumulator over all of K is a chain of K additions, an error
// several times torch's blocked GEMM's.
constexpr int64_t kPanelBlock = 16;

inline void add_and_clear(float* total, float* acc, int64_t floats) {
  for (int64_t i = 0; i < floats; ++i) {
    total[i] += acc[i];
    acc[i] = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 AVX-512 products.

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")

// y rows [row_begin, row_end) for all batch slices, kVecs vectors of 16 per slice row.
template <int kVecs>
void spmm_rows_avx512(PanelPlanCheck& check, const float* slices, int64_t slice_count, int64_t batch, int64_t k,
                      const float* values, const int64_t* row_ptr, const int16_t* cols, int64_t panel, int64_t n,
                      const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  constexpr int kWidth = 16 * kVecs;
  const int64_t panels = panel_count(k, panel);
  const int64_t group_floats = std::min(kGroupRows, row_end - row_begin) * kWidth;
  Scratch scratch(2 * group_floats);
  float* acc_rows = scratch.data;
  float* total_rows = scratch.data + group_floats;
  for (int64_t group = row_begin; group < row_end; group += kGroupRows) {
    const int64_t group_end = std::min(row_end, group + kGroupRows);
    const int64_t floats = (group_end - group) * kWidth;
    for (int64_t slice = 0; slice < slice_count; ++slice) {
      std::memset(acc_rows, 0, floats * sizeof(float));
      std::memset(total_rows, 0, floats * sizeof(float));
      const float* x_slice = slices + slice * k * kWidth;
      for (int64_t p = 0; p < panels; ++p) {
        if (p % kPanelBlock == 0 && p > 0) add_and_clear(total_rows, acc_rows, floats);
        const float* x_panel = x_slice + p * panel * kWidth;
        const int64_t* segment = row_ptr + p * n;
        const int64_t width = check.width(p);
        // The group's segments are the same for every slice: checked on the first.
        if (slice == 0 && !rows_bounds_ok_avx512(segment, group, group_end, check.nnz())) return check.fail();
        for (int64_t row = group; row < group_end; ++row) {
          int64_t i = segment[row];
          const int64_t end = segment[row + 1];
          if (slice == 0 && !segment_offsets_ok_avx512(cols, i, end, width)) return check.fail();
          if (i == end) continue;
          add_segment_avx512<kVecs>(values, cols, i, end, x_panel, acc_rows + (row - group) * kWidth);
        }
      }
      add_and_clear(total_rows, acc_rows, floats);
      const int64_t lanes = std::min<int64_t>(kWidth, batch - slice * kWidth);
      for (int64_t b = 0; b < lanes; ++b) {
        float* y_row = y + (slice * kWidth + b) * n;
        for (int64_t row = group; row < group_end; ++row) {
          y_row[row] = total_rows[(row - group) * kWidth + b] + (bias != nullptr ? bias[row] : 0.0f);
        }
      }
    }
  }
}

// Batch 1: x (16 KiB for K = 4096) sits in L1 whole; 16 nonzeros at a time gather their x.
void spmv_rows_avx512(PanelPlanCheck& check, const float* x, int64_t k, const float* values, const int64_t* row_ptr,
                      const int16_t* cols, int64_t panel, int64_t n, const float* bias, float* y, int64_t row_begin,
                      int64_t row_end) {
  const int64_t panels = panel_count(k, panel);
  const int64_t floats = (row_end - row_begin) * 16;
  Scratch scratch(2 * floats);
  float* acc_rows = scratch.data;
  float* total_rows = scratch.data + floats;
  std::memset(acc_rows, 0, 2 * floats * sizeof(float));
  for (int64_t p = 0; p < panels; ++p) {
    if (p % kPanelBlock == 0 && p > 0) add_and_clear(total_rows, acc_rows, floats);
    const float* x_panel = x + p * panel;
    const int64_t* segment = row_ptr + p * n;
    const __m256i last = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(check.width(p) - 1)));
    for (int64_t row = row_begin; row < row_end; ++row) {
      int64_t i = segment[row];
      const int64_t end = segment[row + 1];
      if (!segment_bounds_ok(i, end, check.nnz())) return check.fail();
      if (i == end) continue;
      float* out = acc_rows + (row - row_begin) * 16;
      __m512 acc = _mm512_loadu_ps(out);
      // The offsets' check (segment_offsets_ok_avx512) fused into the gathers, which load 16
      // offsets at a time anyway: each below the width and above its predecessor (loaded one
      // element back, which measured cheaper than shifting it in from the registers), before
      // it is used. Lane 0 of the segment's first vector has no predecessor.
      __mmask16 follows = 0xFFFE;
      for (; i + 16 <= end; i += 16, follows = 0xFFFF) {
        const __m256i offsets = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + i));
        const __m256i previous = _mm256_maskz_loadu_epi16(follows, cols + i - 1);
        if (!_kortestz_mask16_u8(_mm256_cmpgt_epu16_mask(offsets, last),
                                 _mm256_mask_cmple_epu16_mask(follows, offsets, previous))) {
          return check.fail();
        }
        const __m512i index = _mm512_cvtepu16_epi32(offsets);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(values + i), _mm512_i32gather_ps(index, x_panel, 4), acc);
      }
      if (i < end) {
        const __mmask16 lanes = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<unsigned>(end - i)));
        const __m256i offsets = _mm256_maskz_loadu_epi16(lanes, cols + i);
        const __m256i previous = _mm256_maskz_loadu_epi16(lanes & follows, cols + i - 1);
        if (!_kortestz_mask16_u8(_mm256_mask_cmpgt_epu16_mask(lanes, offsets, last),
                                 _mm256_mask_cmple_epu16_mask(lanes & follows, offsets, previous))) {
          return check.fail();
        }
        const __m512i index = _mm512_cvtepu16_epi32(offsets);
        const __m512 gathered = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, index, x_panel, 4);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, values + i), gathered, acc);
      }
      _mm512_storeu_ps(out, acc);
    }
  }
  add_and_clear(total_rows, acc_rows, floats);
  for (int64_t row = row_begin; row < row_end; ++row) {
    y[row] = _mm512_reduce_add_ps(_mm512_loadu_ps(total_rows + (row - row_begin) * 16)) +
             (bias != nullptr ? bias[row] : 0.0f);
  }
}

// Sums of four vectors, element t of the result the sum of vector t, in a fixed order.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // 128-bit lane t now holds four partial sums of vector t.
  __m512 lanes = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  lanes = _mm512_add_ps(lanes, _mm512_shuffle_ps(lanes, lanes, _MM_SHUFFLE(2, 3, 0, 1)));
  lanes = _mm512_add_ps(lanes, _mm512_shuffle_ps(lanes, lanes, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, lanes));
}

// values of rows [row_begin, row_end): per nonzero, the dot product of its grad_out and x
// slice rows, four nonzeros at a time (sixteen chains at kVecs = 4), slices in order.
template <int kVecs>
void sddmm_rows_avx512(PanelPlanCheck& check, const float* g_slices, const float* x_slices, int64_t slice_count,
                       int64_t n, int64_t k, const int64_t* row_ptr, const int16_t* cols, int64_t panel, float* values,
                       int64_t row_begin, int64_t row_end) {
  constexpr int kWidth = 16 * kVecs;
  const int64_t panels = panel_count(k, panel);
  for (int64_t slice = 0; slice < slice_count; ++slice) {
    const float* g_slice = g_slices + slice * n * kWidth;
    const float* x_slice = x_slices + slice * k * kWidth;
    for (int64_t p = 0; p < panels; ++p) {
      const float* x_panel = x_slice + p * panel * kWidth;
      const int64_t* segment = row_ptr + p * n;
      const int64_t width = check.width(p);
      if (slice == 0 && !rows_bounds_ok_avx512(segment, row_begin, row_end, check.nnz())) return check.fail();
      for (int64_t row = row_begin; row < row_end; ++row) {
        const int64_t begin = segment[row], end = segment[row + 1];
        if (slice == 0 && !segment_offsets_ok_avx512(cols, begin, end, width)) return check.fail();
        if (begin == end) continue;
        __m512 g[kVecs];
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) g[v] = _mm512_loadu_ps(g_slice + row * kWidth + 16 * v);
        for (int64_t i = begin; i < end; i += 4) {
          const int64_t last = std::min<int64_t>(4, end - i) - 1;
          __m512 dot[4];
#pragma GCC unroll 4
          for (int t = 0; t < 4; ++t) {
            // Past the segment's end, repeat its last nonzero; the store below drops it.
            const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[i + std::min<int64_t>(t, last)])) * kWidth;
            dot[t] = _mm512_mul_ps(g[0], _mm512_loadu_ps(x_col));
#pragma GCC unroll 4
            for (int v = 1; v < kVecs; ++v) dot[t] = _mm512_fmadd_ps(g[v], _mm512_loadu_ps(x_col + 16 * v), dot[t]);
          }
          __m128 sums = sum4(dot[0], dot[1], dot[2], dot[3]);
          const __mmask8 lanes = static_cast<__mmask8>((2u << last) - 1);
          if (slice > 0) sums = _mm_add_ps(sums, _mm_maskz_loadu_ps(lanes, values + i));
          _mm_mask_storeu_ps(values + i, lanes, sums);
        }
      }
    }
  }
}

void spmm_float_avx512(PanelPlanCheck& check, const at::Tensor& x, const float* values, const int64_t* row_ptr,
                       const int16_t* cols, int64_t panel, int64_t n, const float* bias, float* y) {
  const int64_t batch = x.size(0), k = x.size(1);
  if (batch == 1) {
    const at::Tensor x_row = x.stride(1) == 1 ? x : x.contiguous();
    const float* xs = x_row.const_data_ptr<float>();
    parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
      spmv_rows_avx512(check, xs, k, values, row_ptr, cols, panel, n, bias, y, begin, end);
    });
    return;
  }
  const int vecs = vectors_for(batch);
  const at::Tensor slices = batch_slices(x, 16 * vecs);
  const float* xs = slices.const_data_ptr<float>();
  const int64_t slice_count = slices.size(0);
  parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
    switch (vecs) {
      case 4:
        return spmm_rows_avx512<4>(check, xs, slice_count, batch, k, values, row_ptr, cols, panel, n, bias, y, begin,
                                   end);
      case 2:
        return spmm_rows_avx512<2>(check, xs, slice_count, batch, k, values, row_ptr, cols, panel, n, bias, y, begin,
                                   end);
      default:
        return spmm_rows_avx512<1>(check, xs, slice_count, batch, k, values, row_ptr, cols, panel, n, bias, y, begin,
                                   end);
    }
  });
}

void sddmm_float_avx512(PanelPlanCheck& check, const at::Tensor& grad_out, const at::Tensor& x,
                        const int64_t* row_ptr, const int16_t* cols, int64_t panel, float* values) {
  const int64_t batch = x.size(0), k = x.size(1), n = grad_out.size(1);
  const int vecs = vectors_for(batch);
  const at::Tensor g_slices = batch_slices(grad_out, 16 * vecs);
  const at::Tensor x_slices = batch_slices(x, 16 * vecs);
  const float* gs = g_slices.const_data_ptr<float>();
  const float* xs = x_slices.const_data_ptr<float>();
  const int64_t slice_count = x_slices.size(0);
  parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
    switch (vecs) {
      case 4: return sddmm_rows_avx512<4>(check, gs, xs, slice_count, n, k, row_ptr, cols, panel, values, begin, end);
      case 2: return sddmm_rows_avx512<2>(check, gs, xs, slice_count, n, k, row_ptr, cols, panel, values, begin, end);
      default: return sddmm_rows_avx512<1>(check, gs, xs, slice_count, n, k, row_ptr, cols, panel, values, begin, end);
    }
  });
}

#pragma GCC pop_options
#endif  // DYNASPARSE_X86

// ---------------------------------------------------------------------------------------------
// fp32 AVX2 products, for x86 CPUs without AVX-512: the AVX-512 kernels' structure (batch
// slices, row groups, panel blocks, a summation order fixed by the plan and the batch size) at
// 8 floats per vector and 16 registers. Their plan check runs on a segment before its first
// use.

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")

DYNASPARSE_DEFINE_UNROLL(unroll_avx2)

// segment_ok_scalar, 16 offsets per vector (the scalar loop's compare and branch per nonzero
// cost as much as a batch-1 product's arithmetic). AVX2 compares only signed 16-bit lanes:
// flipping the top bit orders the unsigned offsets the same way. A segment whose vectors would
// read outside cols (the plan's first nonzero has no predecessor, the last vector may pass the
// end) is checked by the scalar loop.
inline bool segment_ok_avx2(const int16_t* cols, int64_t begin, int64_t end, int64_t nnz, int64_t width) {
  if (!segment_bounds_ok(begin, end, nnz)) return false;
  if (begin == 0 || begin + ceil_div(end - begin, 16) * 16 > nnz) {
    return segment_ok_scalar(cols, begin, end, nnz, width);
  }
  const __m256i flip = _mm256_set1_epi16(static_cast<int16_t>(0x8000));
  // width is in [1, 65536], so width - 1 fits 16 unsigned bits.
  const __m256i last =
      _mm256_xor_si256(_mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(width - 1))), flip);
  const __m256i lane = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Lane 0 of the segment's first vector has no predecessor in the segment.
  __m256i no_predecessor = _mm256_cmpeq_epi16(lane, _mm256_setzero_si256());
  __m256i bad = _mm256_setzero_si256();
  for (int64_t i = begin; i < end; i += 16) {
    const auto count = static_cast<int16_t>(std::min<int64_t>(16, end - i));
    const __m256i used = _mm256_cmpgt_epi16(_mm256_set1_epi16(count), lane);
    const __m256i offsets = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + i)), flip);
    const __m256i previous =
        _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + i - 1)), flip);
    const __m256i ascending = _mm256_or_si256(_mm256_cmpgt_epi16(offsets, previous), no_predecessor);
    const __m256i wrong = _mm256_or_si256(_mm256_cmpgt_epi16(offsets, last), _mm256_xor_si256(ascending, used));
    bad = _mm256_or_si256(bad, _mm256_and_si256(wrong, used));
    no_predecessor = _mm256_setzero_si256();
  }
  return _mm256_testz_si256(bad, bad);
}

// 8-float vectors per slice row for `batch` rows: 32-row slices unless the batch is small.
inline int vectors_for_avx2(int64_t batch) { return batch > 16 ? 4 : batch > 8 ? 2 : 1; }

// add_segment_avx512 at 8 floats per vector: kSets accumulator sets keep eight FMA chains in
// flight (Zen 3 and Intel client cores: two FMA ports, 4-cycle latency), summed pairwise.
template <int kVecs>
__attribute__((always_inline)) inline void add_segment_avx2(const float* values, const int16_t* cols, int64_t i,
                                                             int64_t end, const float* x_panel, float* out) {
  constexpr int kWidth = 8 * kVecs;
  constexpr int kSets = 8 / kVecs;
  __m256 acc[kSets][kVecs];
  unroll_avx2<kSets>([&](auto s) { unroll_avx2<kVecs>([&](auto v) { acc[s][v] = _mm256_setzero_ps(); }); });
  const int64_t whole = end - (end - i) % kSets;
  for (int64_t tail = whole; tail < end; ++tail) {
    const __m256 value = _mm256_set1_ps(values[tail]);
    const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[tail])) * kWidth;
    unroll_avx2<kVecs>([&](auto v) { acc[0][v] = _mm256_fmadd_ps(value, _mm256_loadu_ps(x_col + 8 * v), acc[0][v]); });
  }
  for (; i < whole; i += kSets) {
    unroll_avx2<kSets>([&](auto s) {
      const __m256 value = _mm256_set1_ps(values[i + s]);
      const float* x_col = x_panel + static_cast<int64_t>(col_offset(cols[i + s])) * kWidth;
      unroll_avx2<kVecs>(
          [&](auto v) { acc[s][v] = _mm256_fmadd_ps(value, _mm256_loadu_ps(x_col + 8 * v), acc[s][v]); });
    });
  }
  unroll_avx2<kVecs>([&](auto v) {
    unroll_avx2<3>([&](auto t) {
      constexpr int stride = 1 << t;
      unroll_avx2<kSets>([&](auto s) {
        if constexpr (s % (2 * stride) == 0 && s + stride < kSets) {
          acc[s][v] = _mm256_add_ps(acc[s][v], acc[s + stride][v]);
        }
      });
    });
    _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(_mm256_loadu_ps(out + 8 * v), acc[0][v]));
  });
}

template <int kVecs>
void spmm_rows_avx2(PanelPlanCheck& check, const float* slices, int64_t slice_count, int64_t batch, int64_t k,
                    const float* values, const int64_t* row_ptr, const int16_t* cols, int64_t panel, int64_t n,
                    const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  constexpr int kWidth = 8 * kVecs;
  const int64_t panels = panel_count(k, panel);
  const int64_t group_floats = std::min(kGroupRows, row_end - row_begin) * kWidth;
  Scratch scratch(2 * group_floats);
  float* acc_rows = scratch.data;
  float* total_rows = scratch.data + group_floats;
  for (int64_t group = row_begin; group < row_end; group += kGroupRows) {
    const int64_t group_end = std::min(row_end, group + kGroupRows);
    const int64_t floats = (group_end - group) * kWidth;
    for (int64_t slice = 0; slice < slice_count; ++slice) {
      std::memset(acc_rows, 0, floats * sizeof(float));
      std::memset(total_rows, 0, floats * sizeof(float));
      const float* x_slice = slices + slice * k * kWidth;
      for (int64_t p = 0; p < panels; ++p) {
        if (p % kPanelBlock == 0 && p > 0) add_and_clear(total_rows, acc_rows, floats);
        const float* x_panel = x_slice + p * panel * kWidth;
        const int64_t* segment = row_ptr + p * n;
        const int64_t width = check.width(p);
        for (int64_t row = group; row < group_end; ++row) {
          const int64_t i = segment[row], end = segment[row + 1];
          // The group's segments are the same for every slice: checked on the first.
          if (slice == 0 && !segment_ok_avx2(cols, i, end, check.nnz(), width)) return check.fail();
          if (i == end) continue;
          add_segment_avx2<kVecs>(values, cols, i, end, x_panel, acc_rows + (row - group) * kWidth);
        }
      }
      add_and_clear(total_rows, acc_rows, floats);
      const int64_t lanes = std::min<int64_t>(kWidth, batch - slice * kWidth);
      for (int64_t b = 0; b < lanes; ++b) {
        float* y_row = y + (slice * kWidth + b) * n;
        for (int64_t row = group; row < group_end; ++row) {
          y_row[row] = total_rows[(row - group) * kWidth + b] + (bias != nullptr ? bias[row] : 0.0f);
        }
      }
    }
  }
}

// The eight floats of v summed in a fixed order.
inline float sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

// Batch 1: x sits in L1; two chains of 8 nonzeros per step, the last few scalar. The x values
// are loaded one by one into a vector: vgatherdps measured 4x slower per nonzero on Zen 3.
void spmv_rows_avx2(PanelPlanCheck& check, const float* x, int64_t k, const float* values, const int64_t* row_ptr,
                    const int16_t* cols, int64_t panel, int64_t n, const float* bias, float* y, int64_t row_begin,
                    int64_t row_end) {
  const int64_t panels = panel_count(k, panel);
  const int64_t floats = (row_end - row_begin) * 8;
  Scratch scratch(2 * floats);
  float* acc_rows = scratch.data;
  float* total_rows = scratch.data + floats;
  std::memset(acc_rows, 0, 2 * floats * sizeof(float));
  for (int64_t p = 0; p < panels; ++p) {
    if (p % kPanelBlock == 0 && p > 0) add_and_clear(total_rows, acc_rows, floats);
    const float* x_panel = x + p * panel;
    const int64_t* segment = row_ptr + p * n;
    const int64_t width = check.width(p);
    for (int64_t row = row_begin; row < row_end; ++row) {
      int64_t i = segment[row];
      const int64_t end = segment[row + 1];
      if (!segment_ok_avx2(cols, i, end, check.nnz(), width)) return check.fail();
      if (i == end) continue;
      float* out = acc_rows + (row - row_begin) * 8;
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
      const auto x_at = [&](int64_t j) {
        const int16_t* c = cols + j;
        return _mm256_setr_ps(x_panel[col_offset(c[0])], x_panel[col_offset(c[1])], x_panel[col_offset(c[2])],
                              x_panel[col_offset(c[3])], x_panel[col_offset(c[4])], x_panel[col_offset(c[5])],
                              x_panel[col_offset(c[6])], x_panel[col_offset(c[7])]);
      };
      for (; i + 16 <= end; i += 16) {
        even = _mm256_fmadd_ps(_mm256_loadu_ps(values + i), x_at(i), even);
        odd = _mm256_fmadd_ps(_mm256_loadu_ps(values + i + 8), x_at(i + 8), odd);
      }
      if (i + 8 <= end) {
        even = _mm256_fmadd_ps(_mm256_loadu_ps(values + i), x_at(i), even);
        i += 8;
      }
      float rest = 0.0f;
      for (; i < end; ++i) rest += values[i] * x_panel[col_offset(cols[i])];
      __m256 acc = _mm256_add_ps(_mm256_loadu_ps(out), _mm256_add_ps(even, odd));
      _mm256_storeu_ps(out, _mm256_add_ps(acc, _mm256_setr_ps(rest, 0, 0, 0, 0, 0, 0, 0)));
    }
  }
  add_and_clear(total_rows, acc_rows, floats);
  for (int64_t row = row_begin; row < row_end; ++row) {
    y[row] = sum8(_mm256_loadu_ps(total_rows + (row - row_begin) * 8)) + (bias != nullptr ? bias[row] : 0.0f);
  }
}

// Element t of the result: the sum of the eight floats of vector t, in a fixed order.
inline __m128 sum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

// sddmm_rows_avx512 at 8 floats per vector.
template <int kVecs>
void sddmm_rows_avx2(PanelPlanCheck& check, const float* g_slices, const float* x_slices, int64_t slice_count,
                     int64_t n, int64_t k, const int64_t* row_ptr, const int16_t* cols, int64_t panel, float* values,
                     int64_t row_begin, int64_t row_end) {
  constexpr int kWidth = 8 * kVecs;
  const int64_t panels = panel_count(k, panel);
  for (int64_t slice = 0; slice < slice_count; ++slice) {
    const float* g_slice = g_slices + slice * n * kWidth;
    const float* x_slice = x_slices + slice * k * kWidth;
    for (int64_t p = 0; p < panels; ++p) {
      const float* x_panel = x_slice + p * panel * kWidth;
      const int64_t* segment = row_ptr + p * n;
      const int64_t width = check.width(p);
      for (int64_t row = row_begin; row < row_end; ++row) {
        const int64_t begin = segment[row], end = segment[row + 1];
        if (slice == 0 && !segment_ok_avx2(cols, begin, end, check.nnz(), width)) return check.fail();
        if (begin == end) continue;
        __m256 g[kVecs];
        unroll_avx2<kVecs>([&](auto v) { g[v] = _mm256_loadu_ps(g_slice + row * kWidth + 8 * v); });
        for (int64_t i = begin; i < end; i += 4) {
          const int64_t last = std::min<int64_t>(4, end - i) - 1;
          __m256 dot[4];
          unroll_avx2<4>([&](auto t) {
            // Past the segment's end, repeat its last nonzero; the store below drops it.
            const float* x_col =
                x_panel + static_cast<int64_t>(col_offset(cols[i + std::min<int64_t>(t, last)])) * kWidth;
            dot[t] = _mm256_mul_ps(g[0], _mm256_loadu_ps(x_col));
            unroll_avx2<kVecs - 1>([&](auto v) {
              dot[t] = _mm256_fmadd_ps(g[v + 1], _mm256_loadu_ps(x_col + 8 * (v + 1)), dot[t]);
            });
          });
          __m128 sums = sum4_avx2(dot[0], dot[1], dot[2], dot[3]);
          // A segment's last few sums are stored one by one: a masked store (vmaskmovps)
          // costs AMD cores more than the four dot products.
          if (last == 3) {
            if (slice > 0) sums = _mm_add_ps(sums, _mm_loadu_ps(values + i));
            _mm_storeu_ps(values + i, sums);
          } else {
            alignas(16) float lanes[4];
            _mm_store_ps(lanes, sums);
            for (int64_t t = 0; t <= last; ++t) values[i + t] = (slice > 0 ? values[i + t] : 0.0f) + lanes[t];
          }
        }
      }
    }
  }
}

void spmm_float_avx2(PanelPlanCheck& check, const at::Tensor& x, const float* values, const int64_t* row_ptr,
                     const int16_t* cols, int64_t panel, int64_t n, const float* bias, float* y) {
  const int64_t batch = x.size(0), k = x.size(1);
  if (batch == 1) {
    const at::Tensor x_row = x.stride(1) == 1 ? x : x.contiguous();
    const float* xs = x_row.const_data_ptr<float>();
    parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
      spmv_rows_avx2(check, xs, k, values, row_ptr, cols, panel, n, bias, y, begin, end);
    });
    return;
  }
  const int vecs = vectors_for_avx2(batch);
  const at::Tensor slices = batch_slices(x, 8 * vecs);
  const float* xs = slices.const_data_ptr<float>();
  const int64_t slice_count = slices.size(0);
  parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
    switch (vecs) {
      case 4:
        return spmm_rows_avx2<4>(check, xs, slice_count, batch, k, values, row_ptr, cols, panel, n, bias, y, begin,
                                   end);
      case 2:
        return spmm_rows_avx2<2>(check, xs, slice_count, batch, k, values, row_ptr, cols, panel, n, bias, y, begin,
                                   end);
      default:
        return spmm_rows_avx2<1>(check, xs, slice_count, batch, k, values, row_ptr, cols, panel, n, bias, y, begin,
                                   end);
    }
  });
}

// Batch 1: each value is one product, grad_out[row] * x[col]; batch slices would spend a
// vector of lanes and a horizontal sum on it.
void sddmm_single_rows_avx2(PanelPlanCheck& check, const float* g, int64_t g_stride, const float* x, int64_t x_stride,
                            int64_t k, const int64_t* row_ptr, const int16_t* cols, int64_t panel, int64_t n,
                            float* values, int64_t row_begin, int64_t row_end) {
  for (int64_t p = 0; p < panel_count(k, panel); ++p) {
    const int64_t* segment = row_ptr + p * n;
    const float* x_panel = x + p * panel * x_stride;
    const int64_t width = check.width(p);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t begin = segment[row], end = segment[row + 1];
      if (!segment_ok_avx2(cols, begin, end, check.nnz(), width)) return check.fail();
      const float g_row = g[row * g_stride];
      for (int64_t i = begin; i < end; ++i) values[i] = g_row * x_panel[col_offset(cols[i]) * x_stride];
    }
  }
}

// Batch 1 on AVX2 and AVX-512 CPUs alike (a scalar product per value).
void sddmm_single_avx2(PanelPlanCheck& check, const at::Tensor& grad_out, const at::Tensor& x,
                       const int64_t* row_ptr, const int16_t* cols, int64_t panel, float* values) {
  const int64_t k = x.size(1), n = grad_out.size(1);
  const float* g = grad_out.const_data_ptr<float>();
  const float* xs = x.const_data_ptr<float>();
  parallel_for(0, n, product_row_grain(check, 1), [&](int64_t begin, int64_t end) {
    sddmm_single_rows_avx2(check, g, grad_out.stride(1), xs, x.stride(1), k, row_ptr, cols, panel, n, values, begin,
                           end);
  });
}

void sddmm_float_avx2(PanelPlanCheck& check, const at::Tensor& grad_out, const at::Tensor& x,
                      const int64_t* row_ptr, const int16_t* cols, int64_t panel, float* values) {
  const int64_t batch = x.size(0), k = x.size(1), n = grad_out.size(1);
  const int vecs = vectors_for_avx2(batch);
  const at::Tensor g_slices = batch_slices(grad_out, 8 * vecs);
  const at::Tensor x_slices = batch_slices(x, 8 * vecs);
  const float* gs = g_slices.const_data_ptr<float>();
  const float* xs = x_slices.const_data_ptr<float>();
  const int64_t slice_count = x_slices.size(0);
  parallel_for(0, n, product_row_grain(check, batch), [&](int64_t begin, int64_t end) {
    switch (vecs) {
      case 4: return sddmm_rows_avx2<4>(check, gs, xs, slice_count, n, k, row_ptr, cols, panel, values, begin, end);
      case 2: return sddmm_rows_avx2<2>(check, gs, xs, slice_count, n, k, row_ptr, cols, panel, values, begin, end);
      default: return sddmm_rows_avx2<1>(check, gs, xs, slice_count, n, k, row_ptr, cols, panel, values, begin, end);
    }
  });
}

#pragma GCC pop_options
#endif  // DYNASPARSE_X86

at::Tensor spmm_panels_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& row_ptr,
                           const at::Tensor& cols, int64_t panel, int64_t n, const c10::optional<at::Tensor>& bias_in) {
  check_spmm_panels(x_in, values_in, row_ptr, cols, panel, n, bias_in);
  PanelPlanCheck check("spmm_panels", row_ptr, cols, panel, n, x_in.size(-1));
  const at::Tensor x = as_rows(x_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = n;
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (y.numel() == 0) {
    check.all();
    return y.view(out_sizes);
  }
  const int64_t* starts = row_ptr.const_data_ptr<int64_t>();
  const int16_t* offsets = cols.const_data_ptr<int16_t>();
#if DYNASPARSE_X86
  const CpuIsa isa = cpu_isa();
  if (runs_in_float(x.scalar_type()) && isa != CpuIsa::kPortable) {
    const at::Tensor x_float = as_float(x), values_float = as_float(values), bias_float = as_float(bias);
    at::Tensor y_float = x.scalar_type() == at::kFloat ? y : at::empty(y.sizes(), y.options().dtype(at::kFloat));
    const auto spmm_float = isa == CpuIsa::kAvx512 ? spmm_float_avx512 : spmm_float_avx2;
    spmm_float(check, x_float, values_float.const_data_ptr<float>(), starts, offsets, panel, n,
               bias_float.defined() ? bias_float.const_data_ptr<float>() : nullptr, y_float.data_ptr<float>());
    check.finish();
    if (!y_float.is_same(y)) y.copy_(y_float);
    return y.view(out_sizes);
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spmm_panels", [&] {
    spmm_generic<scalar_t>(check, x, values.const_data_ptr<scalar_t>(), starts, offsets, panel, n,
                           bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
  });
  check.finish();
  return y.view(out_sizes);
}

at::Tensor sddmm_panels_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& row_ptr,
                            const at::Tensor& cols, int64_t panel) {
  check_sddmm_panels(grad_out_in, x_in, row_ptr, cols, panel);
  PanelPlanCheck check("sddmm_panels", row_ptr, cols, panel, grad_out_in.size(-1), x_in.size(-1));
  const at::Tensor grad_out = as_rows(grad_out_in);
  const at::Tensor x = as_rows(x_in);
  at::Tensor values = at::empty({cols.numel()}, x.options());
  if (values.numel() == 0 || x.size(0) == 0) {
    check.all();
    return values.zero_();
  }
  const int64_t* starts = row_ptr.const_data_ptr<int64_t>();
  const int16_t* offsets = cols.const_data_ptr<int16_t>();
#if DYNASPARSE_X86
  const CpuIsa isa = cpu_isa();
  if (runs_in_float(x.scalar_type()) && isa != CpuIsa::kPortable) {
    at::Tensor values_float =
        x.scalar_type() == at::kFloat ? values : at::empty(values.sizes(), values.options().dtype(at::kFloat));
    const auto sddmm_float = x.size(0) == 1            ? sddmm_single_avx2
                             : isa == CpuIsa::kAvx512 ? sddmm_float_avx512
                                                      : sddmm_float_avx2;
    sddmm_float(check, as_float(grad_out), as_float(x), starts, offsets, panel, values_float.data_ptr<float>());
    check.finish();
    if (!values_float.is_same(values)) values.copy_(values_float);
    return values;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sddmm_panels", [&] {
    sddmm_generic<scalar_t>(check, grad_out, x, starts, offsets, panel, values.data_ptr<scalar_t>());
  });
  check.finish();
  return values;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) {
  m.impl("plan_panels", &plan_panels_cpu);
  m.impl("pack_panels", &pack_panels_cpu);
  m.impl("unpack_panels", &unpack_panels_cpu);
  m.impl("spmm_panels", &spmm_panels_cpu);
  m.impl("sddmm_panels", &sddmm_panels_cpu);
}

}  // namespace dynasparse
