// CPU kernel of a convolution's masked weight gradient over a panel plan
// (conv2d_sddmm_panels; layout in csrc/ops.cpp): values[i] = sum over images and output
// pixels of grad_out[b, n, pixel] * im2col(x)[b, k, pixel] at each plan nonzero (n, k), an
// implicit GEMM that never writes the unfolded input.
//
// Generic (any dtype, any CPU): one (panel, row) segment per task, each nonzero a scalar sum
// over images and the output pixels its kernel tap reaches, in that order.
//
// fp32 on AVX-512 (half types widened to fp32 first): the pixels are cut into blocks of
// kBlockVectors 16-lane vectors (part of one image, or several small images). For each block
// and K-panel, the im2col tile of kTileColumns columns by the block's vectors is built in cache,
// tile[k][vector], and each row's nonzeros inside those columns, up to 8 at a time, sum their
// products with the row's grad_out in 8 vector accumulators over the whole block (one grad_out
// load per 8 FMAs) before one horizontal reduction. The block's grad_out rows stay in L2 while
// every panel passes, so each is read from memory once. Block ranges are the parallel tasks: a
// fixed number of them, each summing into its own copy of the values, added in task order at
// the end, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "matmul.h"
#include "conv_tiles.h"
#include "panels.h"
#include "parallel.h"

namespace dynasparse {
namespace {

// Outputs o in [0, count) whose input o * stride + offset lies in [0, size): [first, end).
struct Reach {
  int64_t first, end;
};

inline Reach reach(int64_t count, int64_t size, int64_t stride, int64_t offset) {
  const int64_t first = offset >= 0 ? 0 : ceil_div(-offset, stride);
  const int64_t end = size - 1 - offset < 0 ? 0 : std::min(count, (size - 1 - offset) / stride + 1);
  return {first, std::max(first, end)};
}

// ---------------------------------------------------------------------------------------------
// Generic.

template <typename scalar_t>
void sddmm_generic(PanelPlanCheck& check, const ConvShape& s, const scalar_t* g, const scalar_t* x,
                   const int64_t* row_ptr, const int16_t* cols, int64_t panel, scalar_t* values) {
  using acc_t = long_sum_t<scalar_t>;
  const int64_t taps = s.kh * s.kw, pixels = s.pixels(), plane = s.height * s.width;
  const int64_t segments = panel_count(s.k, panel) * s.n;
  const int64_t grain = work_grain(segments, check.nnz() * s.batch * pixels, 1);
  parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t segment = begin; segment < end; ++segment) {
      const int64_t p = segment / s.n, row = segment % s.n;
      if (!segment_ok_scalar(cols, row_ptr[segment], row_ptr[segment + 1], check.nnz(), check.width(p))) {
        return check.fail();
      }
      for (int64_t i = row_ptr[segment]; i < row_ptr[segment + 1]; ++i) {
        const int64_t kk = p * panel + col_offset(cols[i]);
        const int64_t c = kk / taps, dy = (kk % taps) / s.kw, dx = kk % s.kw;
        const int64_t row_offset = dy * s.dh - s.ph, column_offset = dx * s.dw - s.pw;
        const Reach rows = reach(s.out_h, s.height, s.sh, row_offset);
        const Reach columns = reach(s.out_w, s.width, s.sw, column_offset);
        acc_t acc = 0;
        for (int64_t b = 0; b < s.batch; ++b) {
          const scalar_t* g_plane = g + (b * s.n + row) * pixels;
          const scalar_t* x_plane = x + (b * s.channels + c) * plane;
          for (int64_t oy = rows.first; oy < rows.end; ++oy) {
            const scalar_t* g_line = g_plane + oy * s.out_w;
            const scalar_t* x_line = x_plane + (oy * s.sh + row_offset) * s.width + column_offset;
            for (int64_t ox = columns.first; ox < columns.end; ++ox) {
              acc += static_cast<acc_t>(g_line[ox]) * static_cast<acc_t>(x_line[ox * s.sw]);
            }
          }
        }
        values[i] = static_cast<scalar_t>(acc);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// fp32 AVX-512.

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")
// GCC 12's shuffle intrinsics pass _mm512_undefined_ps() as the unused merge source, which
// -Wall reports as maybe uninitialized once inlined here (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16-lane vectors per pixel block and im2col columns per tile: a 128 KiB tile, in L2. Of 8 to
// 64 vectors by 32 to 128 columns, 32 x 64 measured best for 3x3 convolutions at 90% sparsity
// (64 channels at 32 x 32 and 256 at 8 x 8, batch 32): the longer a block, the fewer horizontal
// sums per FMA; an L1-sized tile (8 x 64) was 1.3x slower.
constexpr int64_t kBlockVectors = 32;
constexpr int64_t kTileColumns = 64;
// Parallel tasks (each with its own copy of the values): enough to balance a few threads.
constexpr int64_t kTasks = 8;
// Sums of eight vectors, element t the sum of vector t, in a fixed order. By value: given the
// accumulators' address, GCC 12 keeps them in memory and stores all of them on every FMA step.
__attribute__((always_inline)) inline __m256 sum8(__m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4, __m512 a5,
                                                  __m512 a6, __m512 a7) {
  // Per 128-bit block, t01 = [a0 0+2, a0 1+3, a1 0+2, a1 1+3]; then u0 = one partial sum of
  // each of vectors 0-3 (u1: 4-7).
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_ps(a0, a1, 0x44), _mm512_shuffle_ps(a0, a1, 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_ps(a2, a3, 0x44), _mm512_shuffle_ps(a2, a3, 0xEE));
  const __m512 t45 = _mm512_add_ps(_mm512_shuffle_ps(a4, a5, 0x44), _mm512_shuffle_ps(a4, a5, 0xEE));
  const __m512 t67 = _mm512_add_ps(_mm512_shuffle_ps(a6, a7, 0x44), _mm512_shuffle_ps(a6, a7, 0xEE));
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x88), _mm512_shuffle_ps(t01, t23, 0xDD));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_ps(t45, t67, 0x88), _mm512_shuffle_ps(t45, t67, 0xDD));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x44), _mm512_shuffle_f32x4(u0, u1, 0xEE));
  return _mm512_castps512_ps256(
      _mm512_add_ps(_mm512_shuffle_f32x4(w, w, 0x08), _mm512_shuffle_f32x4(w, w, 0x0D)));
}

// out[i, i + kGroup) += the dot products over the block of grad_out row g_row (per image
// g_image apart, `vectors` per image, the last one's lanes `tail`) with the tile rows of
// nonzeros [i, i + kGroup), whose column offsets start the tile at first_column.
template <int kGroup>
__attribute__((always_inline)) inline void add_group(const float* tile, int64_t tile_row, int64_t first_column,
                                                     const int16_t* cols, int64_t i, const float* g_row,
                                                     int64_t g_image, int64_t images, int64_t vectors, __mmask16 tail,
                                                     float* out) {
  __m512 acc[8];
  const float* column[kGroup];
  unroll<8>([&](auto t) { acc[t] = _mm512_setzero_ps(); });
  unroll<kGroup>([&](auto t) { column[t] = tile + (col_offset(cols[i + t]) - first_column) * tile_row; });
  for (int64_t image = 0; image < images; ++image) {
    const float* g = g_row + image * g_image;
    const int64_t offset = image * vectors * 16;
    int64_t v = 0;
    for (; v + 1 < vectors; ++v) {
      const __m512 grad = _mm512_loadu_ps(g + 16 * v);
      unroll<kGroup>([&](auto t) {
        acc[t] = _mm512_fmadd_ps(grad, _mm512_loadu_ps(column[t] + offset + 16 * v), acc[t]);
      });
    }
    const __m512 grad = _mm512_maskz_loadu_ps(tail, g + 16 * v);
    unroll<kGroup>([&](auto t) {
      acc[t] = _mm512_fmadd_ps(grad, _mm512_loadu_ps(column[t] + offset + 16 * v), acc[t]);
    });
  }
  constexpr auto lanes = static_cast<__mmask8>((1u << kGroup) - 1);
  const __m256 sums = sum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
  _mm256_mask_storeu_ps(out + i, lanes, _mm256_add_ps(_mm256_maskz_loadu_ps(lanes, out + i), sums));
}

// add_group of `count` (1 to 8) nonzeros: one exact size each (measured 10-15% faster than
// rounding groups up to 4 or 8 nonzeros, which costs FMAs on repeated columns).
__attribute__((always_inline)) inline void add_nonzeros(int64_t count, const float* tile, int64_t tile_row,
                                                        int64_t first_column, const int16_t* cols, int64_t i,
                                                        const float* g_row, int64_t g_image, int64_t images,
                                                        int64_t vectors, __mmask16 tail, float* out) {
#define DYNASPARSE_ADD_GROUP(size) \
  add_group<size>(tile, tile_row, first_column, cols, i, g_row, g_image, images, vectors, tail, out)
  switch (count) {
    case 8: return DYNASPARSE_ADD_GROUP(8);
    case 7: return DYNASPARSE_ADD_GROUP(7);
    case 6: return DYNASPARSE_ADD_GROUP(6);
    case 5: return DYNASPARSE_ADD_GROUP(5);
    case 4: return DYNASPARSE_ADD_GROUP(4);
    case 3: return DYNASPARSE_ADD_GROUP(3);
    case 2: return DYNASPARSE_ADD_GROUP(2);
    default: return DYNASPARSE_ADD_GROUP(1);
  }
#undef DYNASPARSE_ADD_GROUP
}

class SddmmAvx512 {
 public:
  SddmmAvx512(const ConvShape& s, const float* g, const float* x, const int16_t* cols, int64_t panel,
              const int64_t* cuts)
      : s_(s), g_(g), x_(x), cols_(cols), panel_(panel), cuts_(cuts), subtiles_(ceil_div(panel, kTileColumns)),
        layout_(s, kBlockVectors) {}

  int64_t blocks() const { return layout_.blocks(); }

  // Adds blocks [begin, end) into out (the values, in plan order).
  void run(int64_t begin, int64_t end, float* out) const {
    BlockReader<kBlockVectors> reader(s_);
    Scratch tile_scratch(kTileColumns * kBlockVectors * 16);
    float* tile = tile_scratch.data;
    const int64_t plane = s_.height * s_.width, pixels = s_.pixels();
    const int64_t panels = panel_count(s_.k, panel_);
    int64_t read_begin = 0, read_end = 0;
    for (int64_t index = begin; index < end; ++index) {
      const Block blk = layout_.block(index);
      reader.move_to(blk.first_pixel, blk.vectors, &read_begin, &read_end);
      const int64_t tile_row = blk.images * blk.vectors * 16;
      const int64_t last_lanes = std::min<int64_t>(16, pixels - blk.first_pixel - 16 * (blk.vectors - 1));
      const auto tail = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<unsigned>(last_lanes)));
      const float* x_block = x_ + blk.image * s_.channels * plane;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t width = panel_width(p, panel_, s_.k);
        for (int64_t t = 0; t * kTileColumns < width; ++t) {
          const int64_t k_begin = p * panel_ + t * kTileColumns;
          const int64_t k_end = p * panel_ + std::min(width, (t + 1) * kTileColumns);
          build_tile(s_, reader, blk, x_block, k_begin, k_end, read_begin, read_end, tile);
          const float* g_block = g_ + blk.image * s_.n * pixels + blk.first_pixel;
          for (int64_t row = 0; row < s_.n; ++row) {
            const int64_t* cut = cuts_ + (p * s_.n + row) * (subtiles_ + 1) + t;
            const float* g_row = g_block + row * pixels;
            for (int64_t i = cut[0]; i < cut[1]; i += 8) {
              add_nonzeros(std::min<int64_t>(8, cut[1] - i), tile, tile_row, t * kTileColumns, cols_, i, g_row,
                           s_.n * pixels, blk.images, blk.vectors, tail, out);
            }
          }
        }
      }
    }
  }

 private:
  const ConvShape& s_;
  const float* g_;
  const float* x_;
  const int16_t* cols_;
  int64_t panel_;
  const int64_t* cuts_;
  int64_t subtiles_;
  BlockLayout layout_;
};

// cuts[(p * n + row) * (subtiles + 1) + t]: where the nonzeros of segment (p, row) at column
// offsets >= t * kTileColumns start. Checks each segment on the way (the only pass over the plan
// before the kernel trusts it).
void plan_cuts_avx512(PanelPlanCheck& check, int64_t subtiles, int64_t* cuts) {
  const int64_t n = check.n(), segments = check.panels() * n;
  const int64_t* row_ptr = check.row_ptr();
  const int16_t* cols = check.cols();
  parallel_for(0, segments, 256, [&](int64_t begin, int64_t end) {
    // Whole rows of one panel at a time for the bounds check.
    for (int64_t first = begin; first < end;) {
      const int64_t p = first / n, last = std::min(end, (p + 1) * n);
      if (!rows_bounds_ok_avx512(row_ptr + p * n, first - p * n, last - p * n, check.nnz())) return check.fail();
      const int64_t width = check.width(p);
      for (int64_t segment = first; segment < last; ++segment) {
        int64_t i = row_ptr[segment];
        const int64_t segment_end = row_ptr[segment + 1];
        if (!segment_offsets_ok_avx512(cols, i, segment_end, width)) return check.fail();
        int64_t* cut = cuts + segment * (subtiles + 1);
        for (int64_t t = 0; t < subtiles; ++t) {
          cut[t] = i;
          while (i < segment_end && col_offset(cols[i]) < (t + 1) * kTileColumns) ++i;
        }
        cut[subtiles] = segment_end;
      }
      first = last;
    }
  });
}

void sddmm_float_avx512(PanelPlanCheck& check, const ConvShape& s, const float* g, const float* x, int64_t panel,
                        float* values) {
  const int64_t subtiles = ceil_div(panel, kTileColumns), nnz = check.nnz();
  std::vector<int64_t> cuts(check.panels() * s.n * (subtiles + 1));
  plan_cuts_avx512(check, subtiles, cuts.data());
  check.finish();
  const SddmmAvx512 kernel(s, g, x, check.cols(), panel, cuts.data());
  const int64_t tasks = std::min(kTasks, kernel.blocks());
  if (tasks == 1) {
    std::memset(values, 0, nnz * sizeof(float));
    kernel.run(0, kernel.blocks(), values);
    return;
  }
  std::vector<float> partial(tasks * nnz, 0.0f);
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      kernel.run(task * kernel.blocks() / tasks, (task + 1) * kernel.blocks() / tasks, partial.data() + task * nnz);
    }
  });
  parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float sum = partial[i];
      for (int64_t task = 1; task < tasks; ++task) sum += partial[task * nnz + i];
      values[i] = sum;
    }
  });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // DYNASPARSE_X86

at::Tensor conv2d_sddmm_panels_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& row_ptr,
                                   const at::Tensor& cols, int64_t panel, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv2d_sddmm_panels(grad_out_in, x_in, row_ptr, cols, panel, kernel_size, stride, padding, dilation);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  ConvShape s{};
  s.batch = x.size(0), s.channels = x.size(1), s.height = x.size(2), s.width = x.size(3);
  s.kh = kernel_size[0], s.kw = kernel_size[1], s.sh = stride[0], s.sw = stride[1];
  s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
  s.out_h = grad_out.size(2), s.out_w = grad_out.size(3);
  s.n = grad_out.size(1), s.k = s.channels * s.kh * s.kw;
  PanelPlanCheck check("conv2d_sddmm_panels", row_ptr, cols, panel, s.n, s.k);
  at::Tensor values = at::empty({cols.numel()}, x.options());
  if (values.numel() == 0 || s.batch == 0) {
    check.all();
    return values.zero_();
  }
  const int64_t* starts = row_ptr.const_data_ptr<int64_t>();
  const int16_t* offsets = cols.const_data_ptr<int16_t>();
#if DYNASPARSE_X86
  if (runs_in_float(x.scalar_type()) && has_avx512() && lanes_fit_int32(s)) {
    const at::Tensor g_float = as_float(grad_out), x_float = as_float(x);
    at::Tensor values_float =
        x.scalar_type() == at::kFloat ? values : at::empty(values.sizes(), values.options().dtype(at::kFloat));
    sddmm_float_avx512(check, s, g_float.const_data_ptr<float>(), x_float.const_data_ptr<float>(), panel,
                       values_float.data_ptr<float>());
    if (!values_float.is_same(values)) values.copy_(values_float);
    return values;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_sddmm_panels", [&] {
    sddmm_generic<scalar_t>(check, s, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), starts,
                            offsets, panel, values.data_ptr<scalar_t>());
  });
  check.finish();
  return values;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) { m.impl("conv2d_sddmm_panels", &conv2d_sddmm_panels_cpu); }

}  // namespace dynasparse
