// CPU kernels of the block plan (b x b blocks, layout in csrc/ops.cpp): plan building, packing,
// unpacking, the forward / input-gradient product (spmm) and the masked weight gradient (sddmm).
//
// Every kept block is a small dense GEMM. The float32 fast path (b in {16, 32, 64}, AVX-512 at
// run time) keeps an 8-row x 16..48-column accumulator tile in zmm registers:
// - spmm works on batch-contiguous copies of x and y (x.T padded to whole blocks and 16 rows of
//   batch), so the tile is 8 output features x 48 batch rows, fed by one broadcast weight per
//   feature and three vector loads of x.T per reduction step; batches under kSmallBatch rows
//   skip the copies and take dot products along the blocks' rows instead;
// - sddmm needs no transposed copies: x's rows are already contiguous along K, so the tile is
//   8 rows of grad_out (broadcast) x 48 columns of x, reduced over the batch.
// Both are parallel over block rows (disjoint outputs); each output's summation order is fixed
// by the plan and the batch, never by the thread count. Other dtypes and block sizes run a
// portable kernel accumulating in at::opmath_type (float for half types).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

// The AVX-512 kernels need x86 and GCC/Clang function-level target attributes; elsewhere
// every op runs the portable kernels.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DYNASPARSE_AVX512_KERNELS 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "half_as_float.h"
#include "matmul.h"
#include "parallel.h"

namespace dynasparse {
namespace {

constexpr int64_t kLanes = 16;     // floats per zmm register
constexpr int kTileRows = 8;       // accumulator tile rows (b is a multiple of 8 on the fast path)
constexpr int kMaxTileVectors = 3; // accumulator tile columns, in zmm registers
// Below this many batch rows spmm reads x in place (dot products) instead of a padded x.T.
constexpr int64_t kSmallBatch = 8;

inline int64_t round_up(int64_t value, int64_t multiple) { return ceil_div(value, multiple) * multiple; }

bool fast_block(int64_t block) { return block == 16 || block == 32 || block == 64; }

bool use_fast_path(at::ScalarType dtype, int64_t block) {
  #ifdef DYNASPARSE_AVX512_KERNELS
  return runs_in_float(dtype) && fast_block(block) && has_avx512();
#else
  return false;
#endif
}

// x (..., K) as [rows, K]; the kernels take its strides, so a view is enough. The row count is
// explicit because reshape cannot infer it when K is 0.
at::Tensor as_rows(const at::Tensor& x) {
  const int64_t k = x.size(-1);
  return x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), k});
}

// --- plan ---

inline bool any_set(const uint8_t* bytes, int64_t count) {
  uint64_t word = 0;
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    uint64_t chunk;
    std::memcpy(&chunk, bytes + i, sizeof(chunk));
    word |= chunk;
  }
  for (; i < count; ++i) word |= bytes[i];
  return word != 0;
}

std::tuple<at::Tensor, at::Tensor> plan_blocks_cpu(const at::Tensor& mask_in, int64_t block) {
  check_plan_blocks(mask_in, block);
  const int64_t n = mask_in.size(0), k = mask_in.size(1);
  const int64_t block_rows = ceil_div(n, block), block_cols = ceil_div(k, block);
  // Row-major and column-major views (e.g. m.T for the input gradient) are scanned in place
  // along their contiguous dimension; any other layout is copied once.
  const bool row_major = mask_in.stride(1) == 1 || k <= 1;
  const bool col_major = !row_major && (mask_in.stride(0) == 1 || n <= 1);
  const at::Tensor mask = row_major || col_major ? mask_in : mask_in.contiguous();
  const int64_t row_stride = mask.stride(0), col_stride = mask.stride(1);
  const auto* base = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());

  std::vector<uint8_t> occupied(block_rows * block_cols, 0);
  std::vector<int64_t> counts(block_rows, 0);
  parallel_for(0, block_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      uint8_t* occ = occupied.data() + br * block_cols;
      const int64_t r0 = br * block, rows = std::min(block, n - r0);
      if (col_major) {
        for (int64_t bc = 0; bc < block_cols; ++bc) {
          const int64_t c1 = std::min(k, (bc + 1) * block);
          for (int64_t c = bc * block; c < c1 && !occ[bc]; ++c) occ[bc] = any_set(base + c * col_stride + r0, rows);
        }
      } else {
        for (int64_t r = r0; r < r0 + rows; ++r) {
          const uint8_t* row = base + r * row_stride;
          for (int64_t bc = 0; bc < block_cols; ++bc) {
            if (!occ[bc]) occ[bc] = any_set(row + bc * block, std::min(block, k - bc * block));
          }
        }
      }
      int64_t count = 0;
      for (int64_t bc = 0; bc < block_cols; ++bc) count += occ[bc];
      counts[br] = count;
    }
  });

  at::Tensor row_ptr = at::empty({block_rows + 1}, mask.options().dtype(at::kLong));
  int64_t* ptr = row_ptr.data_ptr<int64_t>();
  ptr[0] = 0;
  for (int64_t br = 0; br < block_rows; ++br) ptr[br + 1] = ptr[br] + counts[br];
  at::Tensor cols = at::empty({ptr[block_rows]}, mask.options().dtype(at::kInt));
  int32_t* out = cols.data_ptr<int32_t>();
  parallel_for(0, block_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const uint8_t* occ = occupied.data() + br * block_cols;
      int32_t* dst = out + ptr[br];
      for (int64_t bc = 0; bc < block_cols; ++bc) {
        if (occ[bc]) *dst++ = static_cast<int32_t>(bc);
      }
    }
  });
  return {row_ptr, cols};
}

// --- packing ---

// One [b, b] block of where(mask, weight, 0) at block (r0, c0), zero past n and k; any strides.
template <typename scalar_t>
void pack_one_block(const scalar_t* w, int64_t ws0, int64_t ws1, const bool* m, int64_t ms0, int64_t ms1,
                    int64_t n, int64_t k, int64_t r0, int64_t c0, int64_t block, scalar_t* dst) {
  const int64_t rows = std::min(block, n - r0), width = std::min(block, k - c0);
  const scalar_t zero(0);
  std::fill(dst, dst + block * block, zero);
  if (ws0 == 1 && ms0 == 1 && ws1 != 1) {
    // Column-major views (w.T): walk down contiguous columns.
    for (int64_t j = 0; j < width; ++j) {
      const scalar_t* wc = w + (c0 + j) * ws1 + r0;
      const bool* mc = m + (c0 + j) * ms1 + r0;
      for (int64_t i = 0; i < rows; ++i) dst[i * block + j] = mc[i] ? wc[i] : zero;
    }
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* wr = w + (r0 + i) * ws0 + c0 * ws1;
    const bool* mr = m + (r0 + i) * ms0 + c0 * ms1;
    scalar_t* d = dst + i * block;
    if (ws1 == 1 && ms1 == 1) {
      for (int64_t j = 0; j < width; ++j) d[j] = mr[j] ? wr[j] : zero;
    } else {
      for (int64_t j = 0; j < width; ++j) d[j] = mr[j * ms1] ? wr[j * ws1] : zero;
    }
  }
}

at::Tensor pack_blocks_cpu(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& row_ptr_in,
                           const at::Tensor& cols_in, int64_t block) {
  check_pack_blocks(weight, mask, row_ptr_in, cols_in, block);
  const int64_t n = weight.size(0), k = weight.size(1);
  check_block_plan_values("pack_blocks", row_ptr_in, cols_in, block, n, k);
  const int64_t block_rows = ceil_div(n, block);
  at::Tensor values = at::empty({cols_in.numel(), block, block}, weight.options());
  if (values.numel() == 0) return values;
  const int64_t* row_ptr = row_ptr_in.data_ptr<int64_t>();
  const int32_t* cols = cols_in.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "pack_blocks", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    scalar_t* out = values.data_ptr<scalar_t>();
    parallel_for(0, block_rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t br = begin; br < end; ++br) {
        for (int64_t q = row_ptr[br]; q < row_ptr[br + 1]; ++q) {
          pack_one_block(w, weight.stride(0), weight.stride(1), m, mask.stride(0), mask.stride(1), n, k,
                         br * block, cols[q] * block, block, out + q * block * block);
        }
      }
    });
  });
  return values;
}

at::Tensor unpack_blocks_cpu(const at::Tensor& values_in, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                             int64_t n, int64_t k) {
  const int64_t block = check_unpack_blocks(values_in, row_ptr_in, cols_in, n, k);
  check_block_plan_values("unpack_blocks", row_ptr_in, cols_in, block, n, k);
  at::Tensor dense = at::empty({n, k}, values_in.options());
  if (dense.numel() == 0) return dense;
  const at::Tensor values = values_in.contiguous();
  const int64_t* row_ptr = row_ptr_in.data_ptr<int64_t>();
  const int32_t* cols = cols_in.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "unpack_blocks", [&] {
    const scalar_t* src = values.data_ptr<scalar_t>();
    scalar_t* out = dense.data_ptr<scalar_t>();
    parallel_for(0, ceil_div(n, block), 1, [&](int64_t begin, int64_t end) {
      for (int64_t br = begin; br < end; ++br) {
        const int64_t r0 = br * block, rows = std::min(block, n - r0);
        std::fill(out + r0 * k, out + (r0 + rows) * k, scalar_t(0));
        for (int64_t q = row_ptr[br]; q < row_ptr[br + 1]; ++q) {
          const int64_t c0 = cols[q] * block, width = std::min(block, k - c0);
          for (int64_t i = 0; i < rows; ++i) {
            std::copy(src + (q * block + i) * block, src + (q * block + i) * block + width, out + (r0 + i) * k + c0);
          }
        }
      }
    });
  });
  return dense;
}

// --- spmm: y (M, n) = x (M, K) @ W.T ---

template <typename scalar_t>
void spmm_portable(const at::Tensor& x, const at::Tensor& values, const int64_t* row_ptr, const int32_t* cols,
                   int64_t block, int64_t n, const scalar_t* bias, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows_m = x.size(0), k = x.size(1);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* v = values.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  parallel_for(0, ceil_div(n, block), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(block);
    for (int64_t br = begin; br < end; ++br) {
      const int64_t r0 = br * block, rows = std::min(block, n - r0);
      for (int64_t m = 0; m < rows_m; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t q = row_ptr[br]; q < row_ptr[br + 1]; ++q) {
          const int64_t c0 = cols[q] * block, width = std::min(block, k - c0);
          const scalar_t* xm = xp + m * xs0 + c0 * xs1;
          const scalar_t* vb = v + q * block * block;
          for (int64_t i = 0; i < rows; ++i) {
            acc_t sum(0);
            for (int64_t j = 0; j < width; ++j) {
              sum += static_cast<acc_t>(vb[i * block + j]) * static_cast<acc_t>(xm[j * xs1]);
            }
            acc[i] += sum;
          }
        }
        scalar_t* ym = yp + m * n + r0;
        for (int64_t i = 0; i < rows; ++i) {
          ym[i] = static_cast<scalar_t>(bias ? acc[i] + static_cast<acc_t>(bias[r0 + i]) : acc[i]);
        }
      }
    }
  });
}

#ifdef DYNASPARSE_AVX512_KERNELS
// Chains of at most kChainLength products per accumulator, summed into the output: recursive
// summation over all of K (or of the batch, in the SDDMM) is measurably less accurate than
// torch's own GEMM (max error about 1.4x torch's at K = 197), blocked summation is not.
constexpr int64_t kChainLength = 64;

__attribute__((target("avx512f"))) inline void store_or_add(float* out, __m512 value, bool first) {
  _mm512_storeu_ps(out, first ? value : _mm512_add_ps(_mm512_loadu_ps(out), value));
}

// yT[r0 + i0 + r, m0 + 16c] for r < 8, c < VECTORS: the block row's blocks against x.T, whose
// rows are padded to whole blocks (zeros), so no edge tests in the loop.
template <int BLOCK, int VECTORS>
__attribute__((target("avx512f"))) void spmm_tile(const float* blocks, const int32_t* cols, int64_t count,
                                                  int i0, const float* xt, int64_t ldx, float* yt, int64_t ldy) {
  constexpr int64_t kBlocksPerChain = BLOCK >= kChainLength ? 1 : kChainLength / BLOCK;
  int64_t q = 0;
  do {
    __m512 acc[kTileRows][VECTORS];
    for (int r = 0; r < kTileRows; ++r)
      for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm512_setzero_ps();
    const bool first = q == 0;
    for (const int64_t chain_end = std::min(count, q + kBlocksPerChain); q < chain_end; ++q) {
      const float* xb = xt + static_cast<int64_t>(cols[q]) * BLOCK * ldx;
      const float* vb = blocks + q * BLOCK * BLOCK + i0 * BLOCK;
      if (q + 1 < count) _mm_prefetch(reinterpret_cast<const char*>(xt + static_cast<int64_t>(cols[q + 1]) * BLOCK * ldx), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < BLOCK; ++j) {
        __m512 xv[VECTORS];
        for (int c = 0; c < VECTORS; ++c) xv[c] = _mm512_loadu_ps(xb + j * ldx + c * kLanes);
        for (int r = 0; r < kTileRows; ++r) {
          const __m512 wv = _mm512_set1_ps(vb[r * BLOCK + j]);
          for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
        }
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int c = 0; c < VECTORS; ++c) store_or_add(yt + r * ldy + c * kLanes, acc[r][c], first);
  } while (q < count);
}

template <int BLOCK>
__attribute__((target("avx512f"))) void spmm_block_row(const float* values, const int64_t* row_ptr,
                                                       const int32_t* cols, int64_t br, const float* xt,
                                                       int64_t ldx, float* rows) {
  const int64_t first = row_ptr[br], count = row_ptr[br + 1] - first;
  const float* blocks = values + first * BLOCK * BLOCK;
  for (int64_t m0 = 0; m0 < ldx; m0 += kMaxTileVectors * kLanes) {
    const int64_t vectors = std::min<int64_t>(kMaxTileVectors, (ldx - m0) / kLanes);
    for (int i0 = 0; i0 < BLOCK; i0 += kTileRows) {
      float* out = rows + i0 * ldx + m0;
      if (vectors == 3) spmm_tile<BLOCK, 3>(blocks, cols + first, count, i0, xt + m0, ldx, out, ldx);
      else if (vectors == 2) spmm_tile<BLOCK, 2>(blocks, cols + first, count, i0, xt + m0, ldx, out, ldx);
      else spmm_tile<BLOCK, 1>(blocks, cols + first, count, i0, xt + m0, ldx, out, ldx);
    }
  }
}

// Small batches (the x.T copy would be mostly padding): 8 output features x ROWS batch rows of
// dot products along the block's columns, one horizontal sum per output. x's rows are contiguous;
// lanes past K (the last block column) are loaded as zeros, so nothing past x is read.
template <int BLOCK, int ROWS>
__attribute__((target("avx512f"))) void spmm_small_tile(const float* blocks, const int32_t* cols, int64_t count,
                                                        int i0, const float* x, int64_t ldx, int64_t k,
                                                        float* y, int64_t ldy, int64_t rows_out) {
  __m512 acc[kTileRows][ROWS];
  for (int r = 0; r < kTileRows; ++r)
    for (int m = 0; m < ROWS; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t q = 0; q < count; ++q) {
    const int64_t c0 = static_cast<int64_t>(cols[q]) * BLOCK;
    const float* vb = blocks + q * BLOCK * BLOCK + i0 * BLOCK;
    for (int jc = 0; jc < BLOCK; jc += kLanes) {
      const int64_t valid = std::min<int64_t>(kLanes, std::max<int64_t>(0, k - c0 - jc));
      const __mmask16 lanes = static_cast<__mmask16>((1u << valid) - 1u);
      __m512 xv[ROWS];
      for (int m = 0; m < ROWS; ++m) xv[m] = _mm512_maskz_loadu_ps(lanes, x + m * ldx + c0 + jc);
      for (int r = 0; r < kTileRows; ++r) {
        const __m512 wv = _mm512_loadu_ps(vb + r * BLOCK + jc);
        for (int m = 0; m < ROWS; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < std::min<int64_t>(kTileRows, rows_out); ++r)
    for (int m = 0; m < ROWS; ++m) y[m * ldy + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int BLOCK>
__attribute__((target("avx512f"))) void spmm_small_block_row(const float* values, const int64_t* row_ptr,
                                                             const int32_t* cols, int64_t br, const float* x,
                                                             int64_t rows_m, int64_t k, float* y, int64_t n) {
  const int64_t first = row_ptr[br], count = row_ptr[br + 1] - first;
  const float* blocks = values + first * BLOCK * BLOCK;
  for (int64_t m0 = 0; m0 < rows_m; m0 += kMaxTileVectors) {
    const int64_t rows = std::min<int64_t>(kMaxTileVectors, rows_m - m0);
    for (int i0 = 0; i0 < BLOCK; i0 += kTileRows) {
      const int64_t r0 = br * BLOCK + i0;
      if (r0 >= n) break;
      const float* xm = x + m0 * k;
      float* ym = y + m0 * n + r0;
      if (rows == 3) spmm_small_tile<BLOCK, 3>(blocks, cols + first, count, i0, xm, k, k, ym, n, n - r0);
      else if (rows == 2) spmm_small_tile<BLOCK, 2>(blocks, cols + first, count, i0, xm, k, k, ym, n, n - r0);
      else spmm_small_tile<BLOCK, 1>(blocks, cols + first, count, i0, xm, k, k, ym, n, n - r0);
    }
  }
}

// dst[j * ld_dst + i] = src[i * s0 + j * s1] for i < rows, j < cols, in cache-sized tiles.
void transpose_into(const float* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, float* dst,
                    int64_t ld_dst) {
  constexpr int64_t kTile = 32;
  const int64_t tiles_per_task = ceil_div(1 << 16, kTile * std::max<int64_t>(rows, 1));
  parallel_for(0, ceil_div(cols, kTile), tiles_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t jt = begin; jt < end; ++jt) {
      const int64_t j1 = std::min(cols, (jt + 1) * kTile);
      for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
        const int64_t i1 = std::min(rows, i0 + kTile);
        for (int64_t j = jt * kTile; j < j1; ++j)
          for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = src[i * s0 + j * s1];
      }
    }
  });
}

void add_bias(const float* bias, int64_t rows_m, int64_t n, float* y) {
  parallel_for(0, rows_m, ceil_div(1 << 16, std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t r = 0; r < n; ++r) y[m * n + r] += bias[r];
  });
}

void spmm_fast_small(const at::Tensor& x_in, const at::Tensor& values, const int64_t* row_ptr, const int32_t* cols,
                     int64_t block, int64_t n, const float* bias, at::Tensor& y) {
  const at::Tensor x = x_in.contiguous();
  const int64_t rows_m = x.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_for(0, ceil_div(n, block), 1, [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      if (block == 16) spmm_small_block_row<16>(v, row_ptr, cols, br, xp, rows_m, k, yp, n);
      else if (block == 32) spmm_small_block_row<32>(v, row_ptr, cols, br, xp, rows_m, k, yp, n);
      else spmm_small_block_row<64>(v, row_ptr, cols, br, xp, rows_m, k, yp, n);
    }
  });
  if (bias) add_bias(bias, rows_m, n, yp);
}

void spmm_fast(const at::Tensor& x, const at::Tensor& values, const int64_t* row_ptr, const int32_t* cols,
               int64_t block, int64_t n, const float* bias, at::Tensor& y) {
  const int64_t rows_m = x.size(0), k = x.size(1);
  if (rows_m < kSmallBatch) {
    spmm_fast_small(x, values, row_ptr, cols, block, n, bias, y);
    return;
  }
  const int64_t block_rows = ceil_div(n, block);
  const int64_t ldx = round_up(rows_m, kLanes);
  // x.T with zero rows past K and zero columns past the batch: a padded block then multiplies
  // zeros, never whatever lies past x.
  at::Tensor xt = at::zeros({round_up(k, block), ldx}, x.options());
  transpose_into(x.data_ptr<float>(), x.stride(0), x.stride(1), rows_m, k, xt.data_ptr<float>(), ldx);
  const float* xtp = xt.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_for(0, block_rows, 1, [&](int64_t begin, int64_t end) {
    // One block row of y.T at a time, written back (plus bias) while it is still in cache.
    std::vector<float> rows_t(block * ldx);
    for (int64_t br = begin; br < end; ++br) {
      if (block == 16) spmm_block_row<16>(v, row_ptr, cols, br, xtp, ldx, rows_t.data());
      else if (block == 32) spmm_block_row<32>(v, row_ptr, cols, br, xtp, ldx, rows_t.data());
      else spmm_block_row<64>(v, row_ptr, cols, br, xtp, ldx, rows_t.data());
      const int64_t r0 = br * block, rows = std::min(block, n - r0);
      for (int64_t m = 0; m < rows_m; ++m) {
        float* ym = yp + m * n + r0;
        for (int64_t i = 0; i < rows; ++i) ym[i] = rows_t[i * ldx + m] + (bias ? bias[r0 + i] : 0.0f);
      }
    }
  });
}

#endif  // DYNASPARSE_AVX512_KERNELS

at::Tensor spmm_blocks_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& row_ptr_in,
                           const at::Tensor& cols_in, int64_t n, const c10::optional<at::Tensor>& bias_in) {
  const int64_t block = check_spmm_blocks(x_in, values_in, row_ptr_in, cols_in, n, bias_in);
  check_block_plan_values("spmm_blocks", row_ptr_in, cols_in, block, n, x_in.size(-1));
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x_in.options());
  if (y.numel() == 0) return y;
  const at::Tensor x = as_rows(x_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y_rows = y.view({-1, n});
  const int64_t* row_ptr = row_ptr_in.data_ptr<int64_t>();
  const int32_t* cols = cols_in.data_ptr<int32_t>();
#ifdef DYNASPARSE_AVX512_KERNELS
  if (use_fast_path(x.scalar_type(), block)) {
    const at::Tensor bias_float = as_float(bias);
    at::Tensor y_float =
        x.scalar_type() == at::kFloat ? y_rows : at::empty(y_rows.sizes(), y.options().dtype(at::kFloat));
    spmm_fast(as_float(x), as_float(values), row_ptr, cols, block, n,
              bias_float.defined() ? bias_float.data_ptr<float>() : nullptr, y_float);
    if (!y_float.is_same(y_rows)) y_rows.copy_(y_float);
    return y;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spmm_blocks", [&] {
    spmm_portable<scalar_t>(x, values, row_ptr, cols, block, n,
                            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, y_rows);
  });
  return y;
}

// --- sddmm: blocks of grad_out (M, N).T @ x (M, K), zero where the mask is ---

// out's block at (r0, c0) where the mask is set and inside [n, k]; zero elsewhere.
template <typename scalar_t>
void mask_block(scalar_t* out, const bool* m, int64_t ms0, int64_t ms1, int64_t n, int64_t k, int64_t r0,
                int64_t c0, int64_t block) {
  for (int64_t i = 0; i < block; ++i) {
    scalar_t* row = out + i * block;
    if (r0 + i >= n) {
      std::fill(row, row + block, scalar_t(0));
      continue;
    }
    const bool* mr = m + (r0 + i) * ms0 + c0 * ms1;
    const int64_t width = std::min(block, k - c0);
    for (int64_t j = 0; j < width; ++j) row[j] = mr[j * ms1] ? row[j] : scalar_t(0);
    std::fill(row + width, row + block, scalar_t(0));
  }
}

// One block's grad_out.T @ x inside [n, k] (outside is left for mask_block), any block size.
template <typename scalar_t>
void sddmm_one_block(const scalar_t* g, int64_t gs0, const scalar_t* x, int64_t xs0, int64_t rows_m, int64_t n,
                     int64_t k, int64_t r0, int64_t c0, int64_t block, scalar_t* out,
                     std::vector<at::opmath_type<scalar_t>>& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = std::min(block, n - r0), width = std::min(block, k - c0);
  acc.assign(block * block, acc_t(0));
  for (int64_t m = 0; m < rows_m; ++m) {
    const scalar_t* gm = g + m * gs0 + r0;
    const scalar_t* xm = x + m * xs0 + c0;
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t gi = static_cast<acc_t>(gm[i]);
      acc_t* a = acc.data() + i * block;
      for (int64_t j = 0; j < width; ++j) a[j] += gi * static_cast<acc_t>(xm[j]);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) out[i * block + j] = static_cast<scalar_t>(acc[i * block + j]);
}

#ifdef DYNASPARSE_AVX512_KERNELS
// out[c] + r * BLOCK (16 floats) = sum over m of g[m, r] * x_cols[c][m, 0:16], r < 8.
template <int BLOCK, int VECTORS>
__attribute__((target("avx512f"))) void sddmm_tile(const float* g, int64_t ldg, const float* const* x_cols,
                                                   int64_t ldx, int64_t rows_m, float* const* out) {
  int64_t m = 0;
  do {
    __m512 acc[kTileRows][VECTORS];
    for (int r = 0; r < kTileRows; ++r)
      for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm512_setzero_ps();
    const bool first = m == 0;
#pragma GCC unroll 2
    for (const int64_t chain_end = std::min(rows_m, m + kChainLength); m < chain_end; ++m) {
      __m512 xv[VECTORS];
      for (int c = 0; c < VECTORS; ++c) xv[c] = _mm512_loadu_ps(x_cols[c] + m * ldx);
      const float* gm = g + m * ldg;
      for (int r = 0; r < kTileRows; ++r) {
        const __m512 gv = _mm512_set1_ps(gm[r]);
        for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm512_fmadd_ps(gv, xv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int c = 0; c < VECTORS; ++c) store_or_add(out[c] + r * BLOCK, acc[r][c], first);
  } while (m < rows_m);
}

// The block row's full (inside [n, k]) blocks, as a run of 16-column chunks taken three at a
// time (chunks of neighbouring blocks share a tile, which keeps b = 16 efficient too).
template <int BLOCK>
__attribute__((target("avx512f"))) void sddmm_block_row_full(const float* g, int64_t ldg, const float* x,
                                                             int64_t ldx, int64_t rows_m, int64_t r0,
                                                             const int64_t* full, int64_t full_count,
                                                             const int32_t* cols, float* values) {
  constexpr int kChunksPerBlock = BLOCK / kLanes;
  const int64_t chunks = full_count * kChunksPerBlock;
  for (int64_t c0 = 0; c0 < chunks; c0 += kMaxTileVectors) {
    const int vectors = static_cast<int>(std::min<int64_t>(kMaxTileVectors, chunks - c0));
    const float* x_cols[kMaxTileVectors];
    float* outs[kMaxTileVectors];
    for (int c = 0; c < vectors; ++c) {
      const int64_t q = full[(c0 + c) / kChunksPerBlock];
      const int64_t offset = ((c0 + c) % kChunksPerBlock) * kLanes;
      x_cols[c] = x + static_cast<int64_t>(cols[q]) * BLOCK + offset;
      outs[c] = values + q * BLOCK * BLOCK + offset;
    }
    for (int i0 = 0; i0 < BLOCK; i0 += kTileRows) {
      float* shifted[kMaxTileVectors];
      for (int c = 0; c < vectors; ++c) shifted[c] = outs[c] + i0 * BLOCK;
      const float* gi = g + r0 + i0;
      if (vectors == 3) sddmm_tile<BLOCK, 3>(gi, ldg, x_cols, ldx, rows_m, shifted);
      else if (vectors == 2) sddmm_tile<BLOCK, 2>(gi, ldg, x_cols, ldx, rows_m, shifted);
      else sddmm_tile<BLOCK, 1>(gi, ldg, x_cols, ldx, rows_m, shifted);
    }
  }
}

#endif  // DYNASPARSE_AVX512_KERNELS

template <typename scalar_t>
void sddmm_rows(const scalar_t* g, const scalar_t* x, int64_t rows_m, const at::Tensor& mask, const int64_t* row_ptr,
                const int32_t* cols, int64_t block, int64_t n, int64_t k, bool fast, scalar_t* out) {
  const bool* m = mask.data_ptr<bool>();
  parallel_for(0, ceil_div(n, block), 1, [&](int64_t begin, int64_t end) {
    std::vector<at::opmath_type<scalar_t>> acc;
    std::vector<int64_t> full;
    for (int64_t br = begin; br < end; ++br) {
      const int64_t r0 = br * block;
      full.clear();
      for (int64_t q = row_ptr[br]; q < row_ptr[br + 1]; ++q) {
        const int64_t c0 = cols[q] * block;
        if (fast && r0 + block <= n && c0 + block <= k) {
          full.push_back(q);
        } else {
          sddmm_one_block(g, n, x, k, rows_m, n, k, r0, c0, block, out + q * block * block, acc);
        }
      }
#ifdef DYNASPARSE_AVX512_KERNELS
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (!full.empty()) {
          const auto count = static_cast<int64_t>(full.size());
          if (block == 16) sddmm_block_row_full<16>(g, n, x, k, rows_m, r0, full.data(), count, cols, out);
          else if (block == 32) sddmm_block_row_full<32>(g, n, x, k, rows_m, r0, full.data(), count, cols, out);
          else sddmm_block_row_full<64>(g, n, x, k, rows_m, r0, full.data(), count, cols, out);
        }
      }
#endif
      for (int64_t q = row_ptr[br]; q < row_ptr[br + 1]; ++q) {
        mask_block(out + q * block * block, m, mask.stride(0), mask.stride(1), n, k, r0, cols[q] * block, block);
      }
    }
  });
}

at::Tensor sddmm_blocks_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& mask,
                            const at::Tensor& row_ptr_in, const at::Tensor& cols_in, int64_t block) {
  check_sddmm_blocks(grad_out_in, x_in, mask, row_ptr_in, cols_in, block);
  const int64_t n = grad_out_in.size(-1), k = x_in.size(-1);
  check_block_plan_values("sddmm_blocks", row_ptr_in, cols_in, block, n, k);
  at::Tensor values = at::empty({cols_in.numel(), block, block}, x_in.options());
  if (values.numel() == 0) return values;
  // Both are read row by row along their last dimension.
  const at::Tensor g = as_rows(grad_out_in).contiguous();
  const at::Tensor x = as_rows(x_in).contiguous();
  const bool fast = use_fast_path(x.scalar_type(), block);
  if (fast && x.scalar_type() != at::kFloat) {
    const at::Tensor g_float = as_float(g), x_float = as_float(x);
    at::Tensor values_float = at::empty(values.sizes(), values.options().dtype(at::kFloat));
    sddmm_rows(g_float.data_ptr<float>(), x_float.data_ptr<float>(), x.size(0), mask, row_ptr_in.data_ptr<int64_t>(),
               cols_in.data_ptr<int32_t>(), block, n, k, fast, values_float.data_ptr<float>());
    return values.copy_(values_float);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sddmm_blocks", [&] {
    sddmm_rows(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.size(0), mask, row_ptr_in.data_ptr<int64_t>(),
               cols_in.data_ptr<int32_t>(), block, n, k, fast, values.data_ptr<scalar_t>());
  });
  return values;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) {
  m.impl("plan_blocks", &plan_blocks_cpu);
  m.impl("pack_blocks", &pack_blocks_cpu);
  m.impl("unpack_blocks", &unpack_blocks_cpu);
  m.impl("spmm_blocks", &spmm_blocks_cpu);
  m.impl("sddmm_blocks", &sddmm_blocks_cpu);
}

}  // namespace dynasparse
