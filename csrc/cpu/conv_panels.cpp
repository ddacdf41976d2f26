// CPU kernel of the convolution over a panel plan (conv2d_panels; layout in csrc/ops.cpp): an
// implicit GEMM, y[img, n, pixel] = sum over k of W[n, k] * im2col(x)[img, k, pixel], with the
// im2col matrix never written whole.
//
// fp32 on AVX-512: the output pixels are cut into blocks of 4 16-lane vectors (conv_tiles.h,
// shared with the weight gradient): part of one image, or as many whole small images as fit
// (a 40-sample signal is 3 vectors, a 4 x 4 image 1, so four of those share a block). Blocks
// are the parallel tasks, those at one pixel position of every image in turn, so the reader's
// tables are built once per position and thread. For each K-panel a block builds its im2col
// tile, tile[k][image][vector] (the batch-contiguous operand the matmul kernels of
// matmul_panels.cpp read; 64 KiB in L2 at panel 256), then every row of W adds its (panel,
// row) segment into accumulators [rows][block]; row n of a block's accumulators is y[image, n,
// pixels] of each of its images. With stride 1 along rows and outputs at least 8 wide, a
// vector's lanes on one output row read consecutive inputs: one masked load per output row it
// spans (at most 3), and one for all of them where the input is as wide as the output (3 x 3
// "same" convolutions); other geometries gather. Gathering 16-pixel vectors across two rows of
// an 8 x 8 image made the tile build cost most of the kernel: with the masked loads, B64 C32
// N32 8 x 8 at 90% sparsity ran 2.6x faster (one thread). Big images keep that order too:
// visiting one image's blocks in turn, for reuse of their shared input rows, measured no
// faster on B32 C64 N64 32 x 32. Other dtypes and CPUs run a scalar kernel (float
// accumulation for half types). Every output element is summed in plan order, in a block
// layout fixed by the shape, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_tiles.h"
#include "matmul.h"
#include "panels.h"
#include "parallel.h"

namespace dynasparse {
namespace {

// ---------------------------------------------------------------------------------------------
// Generic (any dtype, any CPU): one (image, W row) per task, an accumulator per output pixel,
// the row's nonzeros in plan order.

template <typename scalar_t>
void conv_generic(PanelPlanCheck& check, const ConvShape& s, const scalar_t* x, const scalar_t* values,
                  const int64_t* row_ptr, const int16_t* cols, int64_t panel, const scalar_t* bias, scalar_t* y) {
  using acc_t = long_sum_t<scalar_t>;
  const int64_t panels = panel_count(s.k, panel), pixels = s.pixels(), taps = s.kh * s.kw;
  const int64_t grain = work_grain(s.batch * s.n, check.nnz() * s.batch * pixels, 1);
  parallel_for(0, s.batch * s.n, grain, [&](int64_t begin, int64_t end) {
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
// 16-lane vectors per block: an accumulator row of 64 floats, four registers per nonzero's
// FMAs.
constexpr int64_t kBlockVectors = 4;

class ConvAvx512 {
 public:
  ConvAvx512(PanelPlanCheck& check, const ConvShape& s, const float* x, const float* values, const int64_t* row_ptr,
             const int16_t* cols, int64_t panel, const float* bias, float* y)
      : check_(check), s_(s), x_(x), values_(values), row_ptr_(row_ptr), cols_(cols), panel_(panel), bias_(bias), y_(y),
        layout_(s, kBlockVectors) {}

  int64_t blocks() const { return layout_.blocks(); }

  // Blocks [begin, end); the first checks every plan segment it reads.
  void run(int64_t begin, int64_t end) const {
    BlockReader<kBlockVectors> reader(s_);
    Scratch tile(std::min(panel_, s_.k) * kBlockVectors * 16), acc(std::min(kGroupRows, s_.n) * kBlockVectors * 16);
    int64_t read_begin = 0, read_end = 0;
    for (int64_t index = begin; index < end; ++index) {
      const Block blk = layout_.block(index);
      reader.move_to(blk.first_pixel, blk.vectors, &read_begin, &read_end);
      const Tile t{reader, blk, read_begin, read_end, tile.data, acc.data, index == begin};
      bool ok;
      switch (blk.images * blk.vectors) {
        case 4: ok = block<4>(t); break;
        case 3: ok = block<3>(t); break;
        case 2: ok = block<2>(t); break;
        default: ok = block<1>(t); break;
      }
      if (!ok) return check_.fail();
    }
  }

 private:
  struct Tile {
    const BlockReader<kBlockVectors>& reader;
    const Block& blk;
    int64_t read_begin, read_end;
    float *tile, *acc;
    bool check;
  };

  // One block of kVecs vectors (its images' together): y at its pixels, false where a plan
  // segment failed its check.
  template <int kVecs>
  bool block(const Tile& t) const {
    constexpr int kWidth = 16 * kVecs;
    const Block& blk = t.blk;
    const int64_t pixels = s_.pixels(), panels = panel_count(s_.k, panel_);
    const int64_t last_lanes = std::min<int64_t>(16, pixels - blk.first_pixel - 16 * (blk.vectors - 1));
    const auto tail = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<unsigned>(last_lanes)));
    const float* x_block = x_ + blk.image * s_.channels * s_.height * s_.width;
    for (int64_t group = 0; group < s_.n; group += kGroupRows) {
      const int64_t group_end = std::min(s_.n, group + kGroupRows);
      std::memset(t.acc, 0, (group_end - group) * kWidth * sizeof(float));
      for (int64_t p = 0; p < panels; ++p) {
        build_tile(s_, t.reader, blk, x_block, p * panel_, std::min(s_.k, (p + 1) * panel_), t.read_begin,
                   t.read_end, t.tile);
        const int64_t* segment = row_ptr_ + p * s_.n;
        const int64_t width = check_.width(p);
        // Every block reads every segment: the first block of each thread checks them.
        if (t.check && !rows_bounds_ok_avx512(segment, group, group_end, check_.nnz())) return false;
        for (int64_t row = group; row < group_end; ++row) {
          if (t.check && !segment_offsets_ok_avx512(cols_, segment[row], segment[row + 1], width)) return false;
          if (segment[row] == segment[row + 1]) continue;
          add_segment_avx512<kVecs>(values_, cols_, segment[row], segment[row + 1], t.tile,
                                    t.acc + (row - group) * kWidth);
        }
      }
      for (int64_t row = group; row < group_end; ++row) {
        const __m512 shift = bias_ != nullptr ? _mm512_set1_ps(bias_[row]) : _mm512_setzero_ps();
        const float* sums = t.acc + (row - group) * kWidth;
        for (int64_t image = 0; image < blk.images; ++image) {
          float* out = y_ + ((blk.image + image) * s_.n + row) * pixels + blk.first_pixel;
          for (int64_t v = 0; v < blk.vectors; ++v) {
            const __m512 sum = _mm512_add_ps(_mm512_loadu_ps(sums + (image * blk.vectors + v) * 16), shift);
            if (v + 1 < blk.vectors) {
              _mm512_storeu_ps(out + 16 * v, sum);
            } else {
              _mm512_mask_storeu_ps(out + 16 * v, tail, sum);
            }
          }
        }
      }
    }
    return true;
  }

  PanelPlanCheck& check_;
  const ConvShape& s_;
  const float* x_;
  const float* values_;
  const int64_t* row_ptr_;
  const int16_t* cols_;
  int64_t panel_;
  const float* bias_;
  float* y_;
  BlockLayout layout_;
};

void conv_float_avx512(PanelPlanCheck& check, const ConvShape& s, const float* x, const float* values,
                       const int64_t* row_ptr, const int16_t* cols, int64_t panel, const float* bias, float* y) {
  const ConvAvx512 kernel(check, s, x, values, row_ptr, cols, panel, bias, y);
  const int64_t blocks = kernel.blocks();
  parallel_for(0, blocks, work_grain(blocks, check.nnz() * s.batch * s.pixels(), 1),
               [&](int64_t begin, int64_t end) { kernel.run(begin, end); });
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
  if (runs_in_float(x.scalar_type()) && has_avx512() && lanes_fit_int32(s)) {
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
