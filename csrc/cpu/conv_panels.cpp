// CPU kernel of the convolution over a panel plan (conv2d_panels; layout in csrc/ops.cpp): an
// implicit GEMM, y[img, n, pixel] = sum over k of W[n, k] * im2col(x)[img, k, pixel], with the
// im2col matrix never written whole.
//
// fp32 on AVX-512: a parallel task is one image and a slice of 16, 32 or 64 consecutive output
// pixels. For each K-panel it builds the im2col tile of its slice, tile[k][pixel] (the same
// batch-contiguous operand the matmul kernels of matmul_panels.cpp read; 64 KiB at panel 256
// and 64 pixels, so it stays in L1/L2), then every row of W adds its (panel, row) segment into
// accumulators [rows][pixels]. The accumulator row of W row n is y[img, n, slice] in NCHW and
// is stored as is. With stride 1, the pixels of a 16-lane vector lying on one output row read
// 16 consecutive inputs: one masked load, the masked-off lanes being the zero padding; other
// vectors gather. Other dtypes and CPUs run a scalar kernel (float accumulation for half
// types). Every output element is summed in plan order, so results do not depend on the
// thread count.
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
#include "panels.h"

namespace dynasparse {
namespace {

struct ConvShape {
  int64_t batch, channels, height, width;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w, n, k;
  int64_t pixels() const { return out_h * out_w; }
};

// ---------------------------------------------------------------------------------------------
// Generic (any dtype, any CPU): one (image, W row) per task, an accumulator per output pixel,
// the row's nonzeros in plan order.

template <typename scalar_t>
void conv_generic(const ConvShape& s, const scalar_t* x, const scalar_t* values, const int64_t* row_ptr,
                  const int16_t* cols, int64_t panel, const scalar_t* bias, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t panels = panel_count(s.k, panel), pixels = s.pixels(), taps = s.kh * s.kw;
  at::parallel_for(0, s.batch * s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pixels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / s.n, row = task % s.n;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t i = row_ptr[p * s.n + row]; i < row_ptr[p * s.n + row + 1]; ++i) {
          const int64_t kk = p * panel + col_offset(cols[i]);
          const int64_t dy = (kk % taps) / s.kw, dx = kk % s.kw;
          const scalar_t* plane = x + (img * s.channels + kk / taps) * s.height * s.width;
          const acc_t value = static_cast<acc_t>(values[i]);
          for (int64_t oy = 0; oy < s.out_h; ++oy) {
            const int64_t iy = oy * s.sh + dy * s.dh - s.ph;
            if (iy < 0 || iy >= s.height) continue;
            for (int64_t ox = 0; ox < s.out_w; ++ox) {
              const int64_t ix = ox * s.sw + dx * s.dw - s.pw;
              if (ix >= 0 && ix < s.width) {
                acc[oy * s.out_w + ox] += value * static_cast<acc_t>(plane[iy * s.width + ix]);
              }
            }
          }
        }
      }
      const acc_t shift = bias != nullptr ? static_cast<acc_t>(bias[row]) : acc_t(0);
      scalar_t* out = y + (img * s.n + row) * pixels;
      for (int64_t q = 0; q < pixels; ++q) out[q] = static_cast<scalar_t>(acc[q] + shift);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// fp32 AVX-512.

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

// Rows of W per accumulator group ([rows][64] floats: 128 KiB, in L2 beside the tile); wider
// layers rebuild the tiles once per group.
constexpr int64_t kGroupRows = 512;

// Where the lanes of one 16-pixel vector of a slice read x, before the kernel tap's offset.
struct LaneOrigins {
  __m512i row, col;  // oy * sh - ph, ox * sw - pw
  __mmask16 live;    // pixels inside the image's output (a prefix of the lanes)
  bool one_row;      // stride 1 and every live lane on one output row: consecutive inputs
  int32_t first_row, first_col;
};

LaneOrigins lane_origins(const ConvShape& s, int64_t first_pixel) {
  alignas(64) int32_t rows[16], cols[16];
  LaneOrigins lanes{};
  lanes.one_row = s.sw == 1;
  for (int t = 0; t < 16; ++t) {
    const int64_t q = first_pixel + t;
    if (q >= s.pixels()) {
      rows[t] = cols[t] = 0;
      continue;
    }
    rows[t] = static_cast<int32_t>((q / s.out_w) * s.sh - s.ph);
    cols[t] = static_cast<int32_t>((q % s.out_w) * s.sw - s.pw);
    lanes.live |= static_cast<__mmask16>(1u << t);
    if (rows[t] != rows[0]) lanes.one_row = false;
  }
  lanes.row = _mm512_load_si512(rows);
  lanes.col = _mm512_load_si512(cols);
  lanes.first_row = rows[0];
  lanes.first_col = cols[0];
  return lanes;
}

// tile[k - k_begin][pixel] for k in [k_begin, k_end) of one image's slice.
template <int kVecs>
void build_tile(const ConvShape& s, const float* x_img, const LaneOrigins* lanes, int64_t k_begin, int64_t k_end,
                float* tile) {
  constexpr int kWidth = 16 * kVecs;
  const int64_t taps = s.kh * s.kw, plane_size = s.height * s.width;
  const __m512i height = _mm512_set1_epi32(static_cast<int32_t>(s.height));
  const __m512i width = _mm512_set1_epi32(static_cast<int32_t>(s.width));
  int64_t c = k_begin / taps, dy = (k_begin % taps) / s.kw, dx = k_begin % s.kw;
  for (int64_t kk = k_begin; kk < k_end; ++kk) {
    const float* plane = x_img + c * plane_size;
    const int32_t row_shift = static_cast<int32_t>(dy * s.dh), col_shift = static_cast<int32_t>(dx * s.dw);
    float* out = tile + (kk - k_begin) * kWidth;
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      const LaneOrigins& lane = lanes[v];
      const __m512i iy = _mm512_add_epi32(lane.row, _mm512_set1_epi32(row_shift));
      const __m512i ix = _mm512_add_epi32(lane.col, _mm512_set1_epi32(col_shift));
      // Unsigned compares: negative coordinates (top and left padding) fail them too.
      const __mmask16 inside = lane.live & _mm512_cmplt_epu32_mask(iy, height) & _mm512_cmplt_epu32_mask(ix, width);
      __m512 gathered;
      if (lane.one_row) {
        // The address of lane 0 may lie before the row (left padding): masked-off lanes are
        // never read, so only the in-image lanes touch memory.
        const int64_t first = static_cast<int64_t>(lane.first_row + row_shift) * s.width + lane.first_col + col_shift;
        gathered = inside ? _mm512_maskz_loadu_ps(inside, plane + first) : _mm512_setzero_ps();
      } else {
        const __m512i offsets = _mm512_add_epi32(_mm512_mullo_epi32(iy, width), ix);
        gathered = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, offsets, plane, 4);
      }
      _mm512_storeu_ps(out + 16 * v, gathered);
    }
    if (++dx == s.kw) {
      dx = 0;
      if (++dy == s.kh) {
        dy = 0;
        ++c;
      }
    }
  }
}

template <int kVecs>
void conv_tasks_avx512(const ConvShape& s, const float* x, const float* values, const int64_t* row_ptr,
                       const int16_t* cols, int64_t panel, const float* bias, float* y, int64_t task_begin,
                       int64_t task_end) {
  constexpr int kWidth = 16 * kVecs;
  const int64_t pixels = s.pixels(), slices = ceil_div(pixels, kWidth), panels = panel_count(s.k, panel);
  const int64_t group_size = std::min(kGroupRows, s.n);
  Scratch tile_scratch(std::min(panel, s.k) * kWidth), acc_scratch(group_size * kWidth);
  float* tile = tile_scratch.data;
  float* acc_rows = acc_scratch.data;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t img = task / slices, first_pixel = (task % slices) * kWidth;
    LaneOrigins lanes[kVecs];
    for (int v = 0; v < kVecs; ++v) lanes[v] = lane_origins(s, first_pixel + 16 * v);
    const float* x_img = x + img * s.channels * s.height * s.width;
    for (int64_t group = 0; group < s.n; group += kGroupRows) {
      const int64_t group_end = std::min(s.n, group + kGroupRows);
      std::memset(acc_rows, 0, (group_end - group) * kWidth * sizeof(float));
      for (int64_t p = 0; p < panels; ++p) {
        build_tile<kVecs>(s, x_img, lanes, p * panel, std::min(s.k, (p + 1) * panel), tile);
        const int64_t* segment = row_ptr + p * s.n;
        for (int64_t row = group; row < group_end; ++row) {
          if (segment[row] == segment[row + 1]) continue;
          add_segment_avx512<kVecs>(values, cols, segment[row], segment[row + 1], tile,
                                    acc_rows + (row - group) * kWidth);
        }
      }
      for (int64_t row = group; row < group_end; ++row) {
        const __m512 shift = bias != nullptr ? _mm512_set1_ps(bias[row]) : _mm512_setzero_ps();
        float* out = y + (img * s.n + row) * pixels + first_pixel;
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) {
          const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(acc_rows + (row - group) * kWidth + 16 * v), shift);
          _mm512_mask_storeu_ps(out + 16 * v, lanes[v].live, sum);
        }
      }
    }
  }
}

void conv_float_avx512(const ConvShape& s, const float* x, const float* values, const int64_t* row_ptr,
                       const int16_t* cols, int64_t panel, const float* bias, float* y) {
  const int vecs = vectors_for(s.pixels());
  const int64_t tasks = s.batch * ceil_div(s.pixels(), 16 * vecs);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    switch (vecs) {
      case 4: return conv_tasks_avx512<4>(s, x, values, row_ptr, cols, panel, bias, y, begin, end);
      case 2: return conv_tasks_avx512<2>(s, x, values, row_ptr, cols, panel, bias, y, begin, end);
      default: return conv_tasks_avx512<1>(s, x, values, row_ptr, cols, panel, bias, y, begin, end);
    }
  });
}

#pragma GCC pop_options
#endif  // DYNASPARSE_X86

at::Tensor conv2d_panels_cpu(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& row_ptr,
                             const at::Tensor& cols, int64_t panel, int64_t n, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             const c10::optional<at::Tensor>& bias_in) {
  check_conv2d_panels(x_in, values_in, row_ptr, cols, panel, n, kernel_size, stride, padding, dilation, bias_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  ConvShape s{};
  s.batch = x.size(0), s.channels = x.size(1), s.height = x.size(2), s.width = x.size(3);
  s.kh = kernel_size[0], s.kw = kernel_size[1], s.sh = stride[0], s.sw = stride[1];
  s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
  s.out_h = conv_output_size(s.height, s.kh, s.sh, s.ph, s.dh);
  s.out_w = conv_output_size(s.width, s.kw, s.sw, s.pw, s.dw);
  s.n = n, s.k = s.channels * s.kh * s.kw;
  at::Tensor y = at::empty({s.batch, n, s.out_h, s.out_w}, x.options());
  if (y.numel() == 0) return y;
  const int64_t* starts = row_ptr.const_data_ptr<int64_t>();
  const int16_t* offsets = cols.const_data_ptr<int16_t>();
#if DYNASPARSE_X86
  // The tile builder's lane offsets inside one channel plane are int32.
  const bool plane_fits_int32 = s.height * s.width <= std::numeric_limits<int32_t>::max();
  if (x.scalar_type() == at::kFloat && has_avx512() && plane_fits_int32) {
    conv_float_avx512(s, x.const_data_ptr<float>(), values.const_data_ptr<float>(), starts, offsets, panel,
                      bias.defined() ? bias.const_data_ptr<float>() : nullptr, y.data_ptr<float>());
    return y;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_panels", [&] {
    conv_generic<scalar_t>(s, x.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), starts, offsets,
                           panel, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) { m.impl("conv2d_panels", &conv2d_panels_cpu); }

}  // namespace dynasparse
