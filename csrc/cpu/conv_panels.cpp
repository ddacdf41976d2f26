// CPU kernel of the convolution over a panel plan (conv2d_panels; layout in csrc/ops.cpp): an
// implicit GEMM, y[img, n, pixel] = sum over k of W[n, k] * im2col(x)[img, k, pixel], with the
// im2col matrix never written whole.
//
// fp32 on AVX-512: a parallel task is one image and a slice of 16, 32 or 64 consecutive output
// pixels. For each K-panel it builds the im2col tile of its slice, tile[k][pixel] (the same
// batch-contiguous operand the matmul kernels of matmul_panels.cpp read; 64 KiB in L2 at panel
// 256 and 64 pixels: cutting it into L1-sized 32 KiB halves measured no faster at 90% sparsity
// and 15% slower at 99%), then every row of W adds its (panel, row) segment into
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
#include "parallel.h"

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
void conv_generic(PanelPlanCheck& check, const ConvShape& s, const scalar_t* x, const scalar_t* values,
                  const int64_t* row_ptr, const int16_t* cols, int64_t panel, const scalar_t* bias, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t panels = panel_count(s.k, panel), pixels = s.pixels(), taps = s.kh * s.kw;
  parallel_for(0, s.batch * s.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pixels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / s.n, row = task % s.n;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t p = 0; p < panels; ++p) {
        // Another thread may hold this row's image-0 task: each task checks what it reads
        // (a compare per nonzero beside a pass over every output pixel).
        if (!segment_ok_scalar(cols, row_ptr[p * s.n + row], row_ptr[p * s.n + row + 1], check.nnz(),
                               check.width(p))) {
          return check.fail();
        }
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")

// Rows of W per accumulator group ([rows][64] floats: 128 KiB, in L2 beside the tile); wider
// layers rebuild the tiles once per group.
constexpr int64_t kGroupRows = 512;

// Channels ahead of the tile builder whose inputs are prefetched: x planes are H * W floats
// apart, a stride no hardware prefetcher follows, so without this every channel's rows come
// from L3 or DRAM at full latency (tile building for 8 x 256 x 32 x 32 inputs: 8.1 ms
// without, 2.3 ms with, one thread).
constexpr int64_t kPrefetchChannels = 4;

// Where one task's slice of kVecs * 16 output pixels reads x. Per vector: its lanes' input
// coordinates before the kernel tap's offset, and whether it may load contiguously (stride 1,
// every live lane on one output row); for those, per kernel row dy the plane offset of lane
// 0's input and the lanes whose input row is inside the image, per kernel column dx the lanes
// whose input column is. The tile builder then needs one table lookup and one masked load per
// (tap, vector).
template <int kVecs>
class SliceReader {
 public:
  explicit SliceReader(const ConvShape& s)
      : s_(s), row_offsets_(kVecs * s.kh), row_lanes_(kVecs * s.kh), col_lanes_(kVecs * s.kw) {}

  void start(int64_t first_pixel) {
    const int64_t pixels = s_.pixels();
    for (int v = 0; v < kVecs; ++v) {
      alignas(64) int32_t rows[16], cols[16];
      __mmask16 live = 0;
      bool one_row = s_.sw == 1;
      for (int t = 0; t < 16; ++t) {
        const int64_t q = first_pixel + 16 * v + t;
        rows[t] = cols[t] = 0;
        if (q >= pixels) continue;
        rows[t] = static_cast<int32_t>((q / s_.out_w) * s_.sh - s_.ph);
        cols[t] = static_cast<int32_t>((q % s_.out_w) * s_.sw - s_.pw);
        live |= static_cast<__mmask16>(1u << t);
        if (rows[t] != rows[0]) one_row = false;
      }
      live_[v] = live;
      one_row_[v] = one_row;
      row_[v] = _mm512_load_si512(rows);
      col_[v] = _mm512_load_si512(cols);
      for (int64_t dy = 0; dy < s_.kh; ++dy) {
        const int64_t row = rows[0] + dy * s_.dh;
        row_offsets_[v * s_.kh + dy] = row * s_.width + cols[0];
        row_lanes_[v * s_.kh + dy] = row >= 0 && row < s_.height ? live : 0;
      }
      for (int64_t dx = 0; dx < s_.kw; ++dx) {
        const __m512i col = _mm512_add_epi32(col_[v], _mm512_set1_epi32(static_cast<int32_t>(dx * s_.dw)));
        col_lanes_[v * s_.kw + dx] = _mm512_mask_cmplt_epu32_mask(live, col, width_vector());
      }
    }
    // The plane range this slice reads: from its first pixel's top-left tap to its last
    // pixel's bottom-right tap, clipped to the image.
    const int64_t last_pixel = std::min(pixels, first_pixel + 16 * kVecs) - 1;
    const int64_t top = (first_pixel / s_.out_w) * s_.sh - s_.ph, left = (first_pixel % s_.out_w) * s_.sw - s_.pw;
    const int64_t bottom = (last_pixel / s_.out_w) * s_.sh - s_.ph + (s_.kh - 1) * s_.dh;
    const int64_t right = (last_pixel % s_.out_w) * s_.sw - s_.pw + (s_.kw - 1) * s_.dw;
    read_begin_ = top < 0 ? 0 : std::min(top, s_.height) * s_.width + std::clamp<int64_t>(left, 0, s_.width);
    read_end_ = bottom >= s_.height ? s_.height * s_.width
                                    : std::max<int64_t>(bottom * s_.width + std::min(right + 1, s_.width), read_begin_);
  }

  void prefetch(const float* plane) const {
    for (int64_t i = read_begin_; i < read_end_; i += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(plane + i), _MM_HINT_T0);
    }
  }

  // The 16 floats of vector v at kernel tap (dy, dx) of one channel plane, zero outside.
  __m512 load(const float* plane, int v, int64_t dy, int64_t dx) const {
    if (one_row_[v]) {
      const __mmask16 inside = row_lanes_[v * s_.kh + dy] & col_lanes_[v * s_.kw + dx];
      // Lane 0's address may lie outside the plane (padding): masked-off lanes are never
      // read, and a load with no lane set reads nothing.
      return _mm512_maskz_loadu_ps(inside, plane + row_offsets_[v * s_.kh + dy] + dx * s_.dw);
    }
    const __m512i iy = _mm512_add_epi32(row_[v], _mm512_set1_epi32(static_cast<int32_t>(dy * s_.dh)));
    const __m512i ix = _mm512_add_epi32(col_[v], _mm512_set1_epi32(static_cast<int32_t>(dx * s_.dw)));
    // Unsigned compares: negative coordinates (top and left padding) fail them too.
    const __mmask16 inside = _mm512_mask_cmplt_epu32_mask(live_[v], iy, height_vector()) &
                             _mm512_cmplt_epu32_mask(ix, width_vector());
    const __m512i offsets = _mm512_add_epi32(_mm512_mullo_epi32(iy, width_vector()), ix);
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, offsets, plane, 4);
  }

  __mmask16 live(int v) const { return live_[v]; }

 private:
  __m512i height_vector() const { return _mm512_set1_epi32(static_cast<int32_t>(s_.height)); }
  __m512i width_vector() const { return _mm512_set1_epi32(static_cast<int32_t>(s_.width)); }

  const ConvShape& s_;
  __m512i row_[kVecs], col_[kVecs];  // oy * sh - ph, ox * sw - pw per lane
  __mmask16 live_[kVecs];            // lanes holding a pixel of the image (a prefix)
  bool one_row_[kVecs];
  std::vector<int64_t> row_offsets_;
  std::vector<__mmask16> row_lanes_, col_lanes_;
  int64_t read_begin_ = 0, read_end_ = 0;
};

// tile[k - k_begin][pixel] for k in [k_begin, k_end) of one image's slice.
template <int kVecs>
void build_tile(const ConvShape& s, const SliceReader<kVecs>& reader, const float* x_img, int64_t k_begin,
                int64_t k_end, float* tile) {
  constexpr int kWidth = 16 * kVecs;
  const int64_t taps = s.kh * s.kw, plane_size = s.height * s.width;
  int64_t c = k_begin / taps, dy = (k_begin % taps) / s.kw, dx = k_begin % s.kw;
  if (k_begin == 0) {
    for (int64_t ahead = 0; ahead < std::min(kPrefetchChannels, s.channels); ++ahead) {
      reader.prefetch(x_img + ahead * plane_size);
    }
  }
  for (int64_t kk = k_begin; kk < k_end; ++kk) {
    const float* plane = x_img + c * plane_size;
    if ((kk == k_begin || (dy == 0 && dx == 0)) && c + kPrefetchChannels < s.channels) {
      reader.prefetch(plane + kPrefetchChannels * plane_size);
    }
    float* out = tile + (kk - k_begin) * kWidth;
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(out + 16 * v, reader.load(plane, v, dy, dx));
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
void conv_tasks_avx512(PanelPlanCheck& check, const ConvShape& s, const float* x, const float* values,
                       const int64_t* row_ptr, const int16_t* cols, int64_t panel, const float* bias, float* y,
                       int64_t task_begin, int64_t task_end) {
  constexpr int kWidth = 16 * kVecs;
  const int64_t pixels = s.pixels(), slices = ceil_div(pixels, kWidth), panels = panel_count(s.k, panel);
  const int64_t group_size = std::min(kGroupRows, s.n);
  Scratch tile_scratch(std::min(panel, s.k) * kWidth), acc_scratch(group_size * kWidth);
  float* tile = tile_scratch.data;
  float* acc_rows = acc_scratch.data;
  SliceReader<kVecs> reader(s);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t img = task / slices, first_pixel = (task % slices) * kWidth;
    reader.start(first_pixel);
    const float* x_img = x + img * s.channels * s.height * s.width;
    for (int64_t group = 0; group < s.n; group += kGroupRows) {
      const int64_t group_end = std::min(s.n, group + kGroupRows);
      std::memset(acc_rows, 0, (group_end - group) * kWidth * sizeof(float));
      for (int64_t p = 0; p < panels; ++p) {
        build_tile<kVecs>(s, reader, x_img, p * panel, std::min(s.k, (p + 1) * panel), tile);
        const int64_t* segment = row_ptr + p * s.n;
        const int64_t width = check.width(p);
        // Every task reads every segment: the first task of each thread checks them.
        if (task == task_begin && !rows_bounds_ok_avx512(segment, group, group_end, check.nnz())) return check.fail();
        for (int64_t row = group; row < group_end; ++row) {
          if (task == task_begin && !segment_offsets_ok_avx512(cols, segment[row], segment[row + 1], width)) {
            return check.fail();
          }
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
          _mm512_mask_storeu_ps(out + 16 * v, reader.live(v), sum);
        }
      }
    }
  }
}

void conv_float_avx512(PanelPlanCheck& check, const ConvShape& s, const float* x, const float* values,
                       const int64_t* row_ptr, const int16_t* cols, int64_t panel, const float* bias, float* y) {
  const int vecs = vectors_for(s.pixels());
  const int64_t tasks = s.batch * ceil_div(s.pixels(), 16 * vecs);
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    switch (vecs) {
      case 4: return conv_tasks_avx512<4>(check, s, x, values, row_ptr, cols, panel, bias, y, begin, end);
      case 2: return conv_tasks_avx512<2>(check, s, x, values, row_ptr, cols, panel, bias, y, begin, end);
      default: return conv_tasks_avx512<1>(check, s, x, values, row_ptr, cols, panel, bias, y, begin, end);
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
  PanelPlanCheck check("conv2d_panels", row_ptr, cols, panel, n, s.k);
  at::Tensor y = at::empty({s.batch, n, s.out_h, s.out_w}, x.options());
  if (y.numel() == 0) {
    check.all();
    return y;
  }
  const int64_t* starts = row_ptr.const_data_ptr<int64_t>();
  const int16_t* offsets = cols.const_data_ptr<int16_t>();
#if DYNASPARSE_X86
  // The tile builder's lane offsets inside one channel plane are int32.
  const bool plane_fits_int32 = s.height * s.width <= std::numeric_limits<int32_t>::max();
  if (runs_in_float(x.scalar_type()) && has_avx512() && plane_fits_int32) {
    const at::Tensor x_float = as_float(x), values_float = as_float(values), bias_float = as_float(bias);
    at::Tensor y_float = x.scalar_type() == at::kFloat ? y : at::empty(y.sizes(), y.options().dtype(at::kFloat));
    conv_float_avx512(check, s, x_float.const_data_ptr<float>(), values_float.const_data_ptr<float>(), starts,
                      offsets, panel, bias_float.defined() ? bias_float.const_data_ptr<float>() : nullptr,
                      y_float.data_ptr<float>());
    check.finish();
    if (!y_float.is_same(y)) y.copy_(y_float);
    return y;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_panels", [&] {
    conv_generic<scalar_t>(check, s, x.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), starts,
                           offsets, panel, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                           y.data_ptr<scalar_t>());
  });
  check.finish();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) { m.impl("conv2d_panels", &conv2d_panels_cpu); }

}  // namespace dynasparse
