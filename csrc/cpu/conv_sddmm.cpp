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
#include "panels.h"

namespace dynasparse {
namespace {

struct SddmmShape {
  int64_t batch, channels, height, width;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w, n, k;
  int64_t pixels() const { return out_h * out_w; }
};

// Outputs o in [0, count) whose input o * stride + offset lies in [0, size): [first, end).
struct Reach {
  int64_t first, end;
};

inline Reach reach(int64_t count, int64_t size, int64_t stride, int64_t offset) {
  const int64_t first = offset >= 0 ? 0 : ceil_div(-offset, stride);
  const int64_t end = size - 1 - offset < 0 ? 0 : std::min(count, (size - 1 - offset) / stride + 1);
  return {first, std::max(first, end)};
}

// The tile builder computes input coordinates (from -padding to the last tap's reach) and
// offsets inside one channel plane in int32 lanes.
inline bool lanes_fit_int32(const SddmmShape& s) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t reach_h = (s.out_h - 1) * s.sh + (s.kh - 1) * s.dh, reach_w = (s.out_w - 1) * s.sw + (s.kw - 1) * s.dw;
  return s.height * s.width <= limit && s.ph <= limit && s.pw <= limit && reach_h <= limit && reach_w <= limit;
}

// ---------------------------------------------------------------------------------------------
// Generic.

template <typename scalar_t>
void sddmm_generic(PanelPlanCheck& check, const SddmmShape& s, const scalar_t* g, const scalar_t* x,
                   const int64_t* row_ptr, const int16_t* cols, int64_t panel, scalar_t* values) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = s.kh * s.kw, pixels = s.pixels(), plane = s.height * s.width;
  at::parallel_for(0, panel_count(s.k, panel) * s.n, 1, [&](int64_t begin, int64_t end) {
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
// Channels ahead of the tile builder whose inputs are prefetched (planes lie H * W floats
// apart, a stride no hardware prefetcher follows).
constexpr int64_t kPrefetchChannels = 4;
// A vector of 16 consecutive output pixels spans at most this many output rows where rows are
// at least 8 wide; narrower outputs gather.
constexpr int kSegments = 3;

// Pixels [first, first + 16 * vectors) of one image, the same in every image of a block.
class BlockReader {
 public:
  explicit BlockReader(const SddmmShape& s)
      : s_(s), contiguous_(s.sw == 1 && s.out_w >= 8), taps_(s.kh * s.kw),
        offsets_(taps_ * kSegments * kBlockVectors), lanes_(taps_ * kSegments * kBlockVectors),
        segments_(taps_), row_index_(s.kh * kBlockVectors * 16), row_lanes_(s.kh * kBlockVectors),
        col_index_(s.kw * kBlockVectors * 16), col_lanes_(s.kw * kBlockVectors) {}

  void start(int64_t first_pixel, int64_t vectors) {
    vectors_ = vectors;
    const int64_t pixels = s_.pixels();
    for (int64_t v = 0; v < vectors; ++v) {
      alignas(64) int32_t oy[16], ox[16];
      __mmask16 live = 0;
      for (int t = 0; t < 16; ++t) {
        const int64_t q = first_pixel + 16 * v + t;
        oy[t] = static_cast<int32_t>(q < pixels ? q / s_.out_w : 0);
        ox[t] = static_cast<int32_t>(q < pixels ? q % s_.out_w : 0);
        if (q < pixels) live |= static_cast<__mmask16>(1u << t);
      }
      const __m512i oy_v = _mm512_load_si512(oy), ox_v = _mm512_load_si512(ox);
      for (int64_t dy = 0; dy < s_.kh; ++dy) {
        const __m512i iy = _mm512_add_epi32(_mm512_mullo_epi32(oy_v, _mm512_set1_epi32(static_cast<int32_t>(s_.sh))),
                                            _mm512_set1_epi32(static_cast<int32_t>(dy * s_.dh - s_.ph)));
        // Unsigned compares: negative coordinates (top and left padding) fail them too.
        row_lanes_[dy * kBlockVectors + v] =
            _mm512_mask_cmplt_epu32_mask(live, iy, _mm512_set1_epi32(static_cast<int32_t>(s_.height)));
        _mm512_storeu_si512(&row_index_[(dy * kBlockVectors + v) * 16],
                            _mm512_mullo_epi32(iy, _mm512_set1_epi32(static_cast<int32_t>(s_.width))));
      }
      for (int64_t dx = 0; dx < s_.kw; ++dx) {
        const __m512i ix = _mm512_add_epi32(_mm512_mullo_epi32(ox_v, _mm512_set1_epi32(static_cast<int32_t>(s_.sw))),
                                            _mm512_set1_epi32(static_cast<int32_t>(dx * s_.dw - s_.pw)));
        col_lanes_[dx * kBlockVectors + v] =
            _mm512_cmplt_epu32_mask(ix, _mm512_set1_epi32(static_cast<int32_t>(s_.width)));
        _mm512_storeu_si512(&col_index_[(dx * kBlockVectors + v) * 16], ix);
      }
      if (contiguous_) segment(v, oy, ox, live);
    }
    first_pixel_ = first_pixel;
  }

  // out[v][0, 16) for every vector v: one channel plane at kernel tap `tap` = (dy, dx), zero
  // outside it.
  __attribute__((always_inline)) void copy(const float* plane, int64_t tap, int64_t dy, int64_t dx,
                                           float* out) const {
    if (contiguous_) {
      // Lane 0's address may lie outside the plane (padding): masked-off lanes are never
      // read, and a load with no lane set reads nothing.
      const int64_t* offsets = &offsets_[tap * kSegments * kBlockVectors];
      const __mmask16* lanes = &lanes_[tap * kSegments * kBlockVectors];
      if (segments_[tap] == 1) {
        for (int64_t v = 0; v < vectors_; ++v) {
          _mm512_storeu_ps(out + 16 * v, _mm512_maskz_loadu_ps(lanes[v], plane + offsets[v]));
        }
        return;
      }
      for (int64_t v = 0; v < vectors_; ++v) {
        __m512 row = _mm512_maskz_loadu_ps(lanes[v], plane + offsets[v]);
        row = _mm512_mask_loadu_ps(row, lanes[v + kBlockVectors], plane + offsets[v + kBlockVectors]);
        row = _mm512_mask_loadu_ps(row, lanes[v + 2 * kBlockVectors], plane + offsets[v + 2 * kBlockVectors]);
        _mm512_storeu_ps(out + 16 * v, row);
      }
      return;
    }
    for (int64_t v = 0; v < vectors_; ++v) {
      const __mmask16 inside = row_lanes_[dy * kBlockVectors + v] & col_lanes_[dx * kBlockVectors + v];
      const __m512i index = _mm512_add_epi32(_mm512_loadu_si512(&row_index_[(dy * kBlockVectors + v) * 16]),
                                             _mm512_loadu_si512(&col_index_[(dx * kBlockVectors + v) * 16]));
      _mm512_storeu_ps(out + 16 * v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, index, plane, 4));
    }
  }

  // The plane range [begin, end) this block reads, for prefetching.
  void read_range(int64_t* begin, int64_t* end) const {
    const int64_t last = std::min(s_.pixels(), first_pixel_ + 16 * vectors_) - 1;
    const int64_t top = (first_pixel_ / s_.out_w) * s_.sh - s_.ph;
    const int64_t bottom = (last / s_.out_w) * s_.sh - s_.ph + (s_.kh - 1) * s_.dh;
    *begin = std::clamp<int64_t>(top, 0, s_.height) * s_.width;
    *end = std::max(*begin, (std::clamp<int64_t>(bottom, -1, s_.height - 1) + 1) * s_.width);
  }

 private:
  // Stride 1 along rows: the lanes of one output row read consecutive inputs, so per tap a
  // vector is one masked load per output row it spans, at a lane-shifted address; where the
  // input is as wide as the output the shifts agree and one load serves every row.
  void segment(int64_t v, const int32_t* oy, const int32_t* ox, __mmask16 live) {
    for (int64_t dy = 0; dy < s_.kh; ++dy) {
      for (int64_t dx = 0; dx < s_.kw; ++dx) {
        const int64_t tap = dy * s_.kw + dx;
        const __mmask16 inside = row_lanes_[dy * kBlockVectors + v] & col_lanes_[dx * kBlockVectors + v];
        int count = 0;
        int64_t offsets[kSegments] = {0, 0, 0};
        __mmask16 lanes[kSegments] = {0, 0, 0};
        for (int t = 0; t < 16; ++t) {
          if (!((live >> t) & 1)) continue;
          const int64_t offset =
              (oy[t] * s_.sh + dy * s_.dh - s_.ph) * s_.width + ox[t] + dx * s_.dw - s_.pw - t;
          int which = 0;
          while (which < count && offsets[which] != offset) ++which;
          if (which == count) offsets[count++] = offset;
          lanes[which] |= static_cast<__mmask16>(inside & (1u << t));
        }
        for (int which = 0; which < kSegments; ++which) {
          const int64_t e = (tap * kSegments + which) * kBlockVectors + v;
          offsets_[e] = offsets[which < count ? which : 0];
          lanes_[e] = lanes[which];
        }
        if (v == 0) segments_[tap] = 0;
        segments_[tap] = std::max(segments_[tap], count);
      }
    }
  }

  const SddmmShape& s_;
  const bool contiguous_;
  const int64_t taps_;
  int64_t first_pixel_ = 0, vectors_ = 0;
  std::vector<int64_t> offsets_;  // [tap][segment][vector]
  std::vector<__mmask16> lanes_;
  std::vector<int> segments_;      // per tap, the most any vector needs
  std::vector<int32_t> row_index_;  // [dy][vector][lane]: iy * W
  std::vector<__mmask16> row_lanes_;
  std::vector<int32_t> col_index_;  // [dx][vector][lane]: ix
  std::vector<__mmask16> col_lanes_;
};

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

struct Block {
  int64_t image, images, first_pixel, vectors;  // vectors per image
};

class SddmmAvx512 {
 public:
  SddmmAvx512(const SddmmShape& s, const float* g, const float* x, const int16_t* cols, int64_t panel,
              const int64_t* cuts)
      : s_(s), g_(g), x_(x), cols_(cols), panel_(panel), cuts_(cuts), subtiles_(ceil_div(panel, kTileColumns)),
        image_vectors_(ceil_div(s.pixels(), 16)) {
    if (image_vectors_ >= kBlockVectors) {
      images_per_block_ = 1;
      blocks_per_image_ = ceil_div(image_vectors_, kBlockVectors);
      blocks_ = s.batch * blocks_per_image_;
    } else {
      images_per_block_ = kBlockVectors / image_vectors_;
      blocks_per_image_ = 1;
      blocks_ = ceil_div(s.batch, images_per_block_);
    }
  }

  int64_t blocks() const { return blocks_; }

  // Blocks at one pixel position of every image in turn: the reader's tables (which depend on
  // the position alone) are built once per position.
  Block block(int64_t index) const {
    if (images_per_block_ == 1) {
      const int64_t first = (index / s_.batch) * kBlockVectors;
      return {index % s_.batch, 1, 16 * first, std::min(kBlockVectors, image_vectors_ - first)};
    }
    const int64_t image = index * images_per_block_;
    return {image, std::min(images_per_block_, s_.batch - image), 0, image_vectors_};
  }

  // Adds blocks [begin, end) into out (the values, in plan order).
  void run(int64_t begin, int64_t end, float* out) const {
    BlockReader reader(s_);
    Scratch tile_scratch(kTileColumns * kBlockVectors * 16);
    float* tile = tile_scratch.data;
    const int64_t plane = s_.height * s_.width, pixels = s_.pixels();
    const int64_t panels = panel_count(s_.k, panel_);
    int64_t read_begin = 0, read_end = 0, position = -1;
    for (int64_t index = begin; index < end; ++index) {
      const Block blk = block(index);
      if (blk.first_pixel != position) {
        position = blk.first_pixel;
        reader.start(blk.first_pixel, blk.vectors);
        reader.read_range(&read_begin, &read_end);
      }
      const int64_t tile_row = blk.images * blk.vectors * 16;
      const int64_t last_lanes = std::min<int64_t>(16, pixels - blk.first_pixel - 16 * (blk.vectors - 1));
      const auto tail = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<unsigned>(last_lanes)));
      const float* x_block = x_ + blk.image * s_.channels * plane;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t width = panel_width(p, panel_, s_.k);
        for (int64_t t = 0; t * kTileColumns < width; ++t) {
          const int64_t k_begin = p * panel_ + t * kTileColumns;
          const int64_t k_end = p * panel_ + std::min(width, (t + 1) * kTileColumns);
          build_tile(reader, blk, x_block, k_begin, k_end, read_begin, read_end, tile);
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
  // tile[k - k_begin][image][vector] for k in [k_begin, k_end).
  void build_tile(const BlockReader& reader, const Block& blk, const float* x_block, int64_t k_begin, int64_t k_end,
                  int64_t read_begin, int64_t read_end, float* tile) const {
    const int64_t taps = s_.kh * s_.kw, plane = s_.height * s_.width, image_stride = s_.channels * plane;
    // Each tap of channel c prefetches its share of channel c + kPrefetchChannels: all of it at
    // once, a few KiB, overruns the line fill buffers and stalls the copies.
    const int64_t share = ceil_div(ceil_div(read_end - read_begin, taps), 16) * 16;
    int64_t c = k_begin / taps, tap = k_begin % taps;
    for (int64_t kk = k_begin; kk < k_end; ++kk) {
      const int64_t dy = tap / s_.kw, dx = tap % s_.kw;
      if (c + kPrefetchChannels < s_.channels) {
        const int64_t first = read_begin + tap * share, last = std::min(read_end, first + share);
        for (int64_t image = 0; image < blk.images; ++image) {
          const float* ahead = x_block + image * image_stride + (c + kPrefetchChannels) * plane;
          for (int64_t q = first; q < last; q += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(ahead + q), _MM_HINT_T0);
          }
        }
      }
      float* out = tile + (kk - k_begin) * blk.images * blk.vectors * 16;
      for (int64_t image = 0; image < blk.images; ++image) {
        reader.copy(x_block + image * image_stride + c * plane, tap, dy, dx, out + image * blk.vectors * 16);
      }
      if (++tap == taps) {
        tap = 0;
        ++c;
      }
    }
  }

  const SddmmShape& s_;
  const float* g_;
  const float* x_;
  const int16_t* cols_;
  int64_t panel_;
  const int64_t* cuts_;
  int64_t subtiles_, image_vectors_, images_per_block_, blocks_per_image_, blocks_;
};

// cuts[(p * n + row) * (subtiles + 1) + t]: where the nonzeros of segment (p, row) at column
// offsets >= t * kTileColumns start. Checks each segment on the way (the only pass over the plan
// before the kernel trusts it).
void plan_cuts_avx512(PanelPlanCheck& check, int64_t subtiles, int64_t* cuts) {
  const int64_t n = check.n(), segments = check.panels() * n;
  const int64_t* row_ptr = check.row_ptr();
  const int16_t* cols = check.cols();
  at::parallel_for(0, segments, 256, [&](int64_t begin, int64_t end) {
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

void sddmm_float_avx512(PanelPlanCheck& check, const SddmmShape& s, const float* g, const float* x, int64_t panel,
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
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      kernel.run(task * kernel.blocks() / tasks, (task + 1) * kernel.blocks() / tasks, partial.data() + task * nnz);
    }
  });
  at::parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
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
  SddmmShape s{};
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
