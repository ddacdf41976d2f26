// The im2col tiles of the CPU convolution kernels over a panel plan, shared by the forward
// (conv_panels.cpp) and the weight gradient (conv_sddmm.cpp): blocks of output pixels (part of
// one image, or several small images), a reader that loads one block's inputs at any kernel
// tap, and the tile builder, tile[k][image][vector], that prefetches the channels ahead. Where
// a block is one image's full kMaxVectors vectors with contiguous loads (every block of the
// forward on big images), the builder runs a fixed-count copy: through the runtime-count loop
// the B32 C64 N64 32 x 32 forward (one thread, 90% sparsity) spent about 60% more time
// building tiles and ran 1.2-1.3x slower than the per-image-slice kernel it replaced.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "matmul.h"
#include "panels.h"

namespace dynasparse {

struct ConvShape {
  int64_t batch, channels, height, width;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w, n, k;
  int64_t pixels() const { return out_h * out_w; }
};

// The tile builder computes input coordinates (from -padding to the last tap's reach) and
// offsets inside one channel plane in int32 lanes.
inline bool lanes_fit_int32(const ConvShape& s) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t reach_h = (s.out_h - 1) * s.sh + (s.kh - 1) * s.dh, reach_w = (s.out_w - 1) * s.sw + (s.kw - 1) * s.dw;
  return s.height * s.width <= limit && s.ph <= limit && s.pw <= limit && reach_h <= limit && reach_w <= limit;
}

// A block of output pixels: pixels [first_pixel, first_pixel + 16 * vectors) of images
// [image, image + images).
struct Block {
  int64_t image, images, first_pixel, vectors;  // vectors per image
};

// The blocks of up to block_vectors 16-lane vectors of a batch: images of at least that many
// vectors are cut into blocks, smaller ones grouped whole, as many as fit. Blocks at one pixel
// position of every image come in turn, so a reader's tables (which depend on the position
// alone) are built once per position.
class BlockLayout {
 public:
  BlockLayout(const ConvShape& s, int64_t block_vectors)
      : batch_(s.batch), block_vectors_(block_vectors), image_vectors_(ceil_div(s.pixels(), 16)) {
    if (image_vectors_ >= block_vectors) {
      images_per_block_ = 1;
      blocks_ = s.batch * ceil_div(image_vectors_, block_vectors);
    } else {
      images_per_block_ = block_vectors / image_vectors_;
      blocks_ = ceil_div(s.batch, images_per_block_);
    }
  }

  int64_t blocks() const { return blocks_; }

  Block block(int64_t index) const {
    if (images_per_block_ == 1) {
      const int64_t first = (index / batch_) * block_vectors_;
      return {index % batch_, 1, 16 * first, std::min(block_vectors_, image_vectors_ - first)};
    }
    const int64_t image = index * images_per_block_;
    return {image, std::min(images_per_block_, batch_ - image), 0, image_vectors_};
  }

 private:
  int64_t batch_, block_vectors_, image_vectors_, images_per_block_, blocks_;
};

#if DYNASPARSE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2")

// Channels ahead of the tile builder whose inputs are prefetched (planes lie H * W floats
// apart, a stride no hardware prefetcher follows).
constexpr int64_t kPrefetchChannels = 4;
// A vector of 16 consecutive output pixels spans at most this many output rows where rows are
// at least 8 wide; narrower outputs gather.
constexpr int kSegments = 3;

// Reads pixels [first, first + 16 * vectors) of one image (vectors <= kMaxVectors), the same
// in every image of a block, into im2col tile rows.
template <int64_t kMaxVectors>
class BlockReader {
 public:
  explicit BlockReader(const ConvShape& s)
      : s_(s), contiguous_(s.sw == 1 && s.out_w >= 8), taps_(s.kh * s.kw),
        offsets_(taps_ * kSegments * kMaxVectors), lanes_(taps_ * kSegments * kMaxVectors),
        segments_(taps_), row_index_(s.kh * kMaxVectors * 16), row_lanes_(s.kh * kMaxVectors),
        col_index_(s.kw * kMaxVectors * 16), col_lanes_(s.kw * kMaxVectors) {}

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
        row_lanes_[dy * kMaxVectors + v] =
            _mm512_mask_cmplt_epu32_mask(live, iy, _mm512_set1_epi32(static_cast<int32_t>(s_.height)));
        _mm512_storeu_si512(&row_index_[(dy * kMaxVectors + v) * 16],
                            _mm512_mullo_epi32(iy, _mm512_set1_epi32(static_cast<int32_t>(s_.width))));
      }
      for (int64_t dx = 0; dx < s_.kw; ++dx) {
        const __m512i ix = _mm512_add_epi32(_mm512_mullo_epi32(ox_v, _mm512_set1_epi32(static_cast<int32_t>(s_.sw))),
                                            _mm512_set1_epi32(static_cast<int32_t>(dx * s_.dw - s_.pw)));
        col_lanes_[dx * kMaxVectors + v] =
            _mm512_cmplt_epu32_mask(ix, _mm512_set1_epi32(static_cast<int32_t>(s_.width)));
        _mm512_storeu_si512(&col_index_[(dx * kMaxVectors + v) * 16], ix);
      }
      if (contiguous_) segment(v, oy, ox, live);
    }
    first_pixel_ = first_pixel;
  }

  bool contiguous() const { return contiguous_; }

  // copy() for a block of kMaxVectors contiguous vectors: the count fixed, the loads unroll
  // and no per-vector loop bookkeeping is reloaded after each store (see the header).
  __attribute__((always_inline)) void copy_full(const float* plane, int64_t tap, float* out) const {
    const int64_t* offsets = offsets_.data() + tap * kSegments * kMaxVectors;
    const __mmask16* lanes = lanes_.data() + tap * kSegments * kMaxVectors;
    if (segments_[tap] == 1) {
#pragma GCC unroll 4
      for (int64_t v = 0; v < kMaxVectors; ++v) {
        _mm512_storeu_ps(out + 16 * v, _mm512_maskz_loadu_ps(lanes[v], plane + offsets[v]));
      }
      return;
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < kMaxVectors; ++v) {
      __m512 row = _mm512_maskz_loadu_ps(lanes[v], plane + offsets[v]);
      row = _mm512_mask_loadu_ps(row, lanes[v + kMaxVectors], plane + offsets[v + kMaxVectors]);
      row = _mm512_mask_loadu_ps(row, lanes[v + 2 * kMaxVectors], plane + offsets[v + 2 * kMaxVectors]);
      _mm512_storeu_ps(out + 16 * v, row);
    }
  }

  // out[v][0, 16) for every vector v: one channel plane at kernel tap `tap` = (dy, dx), zero
  // outside it.
  __attribute__((always_inline)) void copy(const float* plane, int64_t tap, int64_t dy, int64_t dx,
                                           float* out) const {
    if (contiguous_) {
      // Lane 0's address may lie outside the plane (padding): masked-off lanes are never
      // read, and a load with no lane set reads nothing.
      const int64_t* offsets = &offsets_[tap * kSegments * kMaxVectors];
      const __mmask16* lanes = &lanes_[tap * kSegments * kMaxVectors];
      if (segments_[tap] == 1) {
        for (int64_t v = 0; v < vectors_; ++v) {
          _mm512_storeu_ps(out + 16 * v, _mm512_maskz_loadu_ps(lanes[v], plane + offsets[v]));
        }
        return;
      }
      for (int64_t v = 0; v < vectors_; ++v) {
        __m512 row = _mm512_maskz_loadu_ps(lanes[v], plane + offsets[v]);
        row = _mm512_mask_loadu_ps(row, lanes[v + kMaxVectors], plane + offsets[v + kMaxVectors]);
        row = _mm512_mask_loadu_ps(row, lanes[v + 2 * kMaxVectors], plane + offsets[v + 2 * kMaxVectors]);
        _mm512_storeu_ps(out + 16 * v, row);
      }
      return;
    }
    for (int64_t v = 0; v < vectors_; ++v) {
      const __mmask16 inside = row_lanes_[dy * kMaxVectors + v] & col_lanes_[dx * kMaxVectors + v];
      const __m512i index = _mm512_add_epi32(_mm512_loadu_si512(&row_index_[(dy * kMaxVectors + v) * 16]),
                                             _mm512_loadu_si512(&col_index_[(dx * kMaxVectors + v) * 16]));
      _mm512_storeu_ps(out + 16 * v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, index, plane, 4));
    }
  }

  // Tables for the block at `first_pixel` and its read range (see read_range), rebuilt only
  // when the position changes: consecutive blocks of a task at one position share them.
  void move_to(int64_t first_pixel, int64_t vectors, int64_t* begin, int64_t* end) {
    if (first_pixel == position_) return;
    position_ = first_pixel;
    start(first_pixel, vectors);
    read_range(begin, end);
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
  // The lanes fall into runs on one output row each (at most kSegments, as rows are at least
  // 8 wide), found once per vector, so the tables cost a few operations per (tap, run) rather
  // than per (tap, lane).
  void segment(int64_t v, const int32_t* oy, const int32_t* ox, __mmask16 live) {
    int runs = 0, run_lane[kSegments] = {0, 0, 0};
    __mmask16 run_lanes[kSegments] = {0, 0, 0};
    for (int t = 0; t < 16; ++t) {
      if (!((live >> t) & 1)) continue;
      if (runs == 0 || oy[t] != oy[run_lane[runs - 1]]) run_lane[runs++] = t;
      run_lanes[runs - 1] |= static_cast<__mmask16>(1u << t);
    }
    for (int64_t dy = 0; dy < s_.kh; ++dy) {
      for (int64_t dx = 0; dx < s_.kw; ++dx) {
        const int64_t tap = dy * s_.kw + dx;
        const __mmask16 inside = row_lanes_[dy * kMaxVectors + v] & col_lanes_[dx * kMaxVectors + v];
        int count = 0;
        int64_t offsets[kSegments] = {0, 0, 0};
        __mmask16 lanes[kSegments] = {0, 0, 0};
        for (int run = 0; run < runs; ++run) {
          const int t = run_lane[run];
          const int64_t offset =
              (oy[t] * s_.sh + dy * s_.dh - s_.ph) * s_.width + ox[t] + dx * s_.dw - s_.pw - t;
          int which = 0;
          while (which < count && offsets[which] != offset) ++which;
          if (which == count) offsets[count++] = offset;
          lanes[which] |= static_cast<__mmask16>(inside & run_lanes[run]);
        }
        for (int which = 0; which < kSegments; ++which) {
          const int64_t e = (tap * kSegments + which) * kMaxVectors + v;
          offsets_[e] = offsets[which < count ? which : 0];
          lanes_[e] = lanes[which];
        }
        if (v == 0) segments_[tap] = 0;
        segments_[tap] = std::max(segments_[tap], count);
      }
    }
  }

  const ConvShape& s_;
  const bool contiguous_;
  const int64_t taps_;
  int64_t first_pixel_ = 0, vectors_ = 0;
  int64_t position_ = -1;  // the first pixel move_to last set up
  std::vector<int64_t> offsets_;  // [tap][segment][vector]
  std::vector<__mmask16> lanes_;
  std::vector<int> segments_;      // per tap, the most any vector needs
  std::vector<int32_t> row_index_;  // [dy][vector][lane]: iy * W
  std::vector<__mmask16> row_lanes_;
  std::vector<int32_t> col_index_;  // [dx][vector][lane]: ix
  std::vector<__mmask16> col_lanes_;
};


// build_tile's rows, with kFull where blk is one image's kMaxVectors contiguous vectors.
template <bool kFull, int64_t kMaxVectors>
void build_rows(const ConvShape& s, const BlockReader<kMaxVectors>& reader, const Block& blk, const float* x_block,
                int64_t k_begin, int64_t k_end, int64_t read_begin, int64_t read_end, float* tile) {
  const int64_t taps = s.kh * s.kw, plane = s.height * s.width, image_stride = s.channels * plane;
  // Each tap of channel c prefetches its share of channel c + kPrefetchChannels: all of it at
  // once, a few KiB, overruns the line fill buffers and stalls the copies.
  const int64_t share = ceil_div(ceil_div(read_end - read_begin, taps), 16) * 16;
  const int64_t row_width = kFull ? kMaxVectors * 16 : blk.images * blk.vectors * 16;
  int64_t c = k_begin / taps, tap = k_begin % taps;
  for (int64_t kk = k_begin; kk < k_end; ++kk) {
    if (c + kPrefetchChannels < s.channels) {
      const int64_t first = read_begin + tap * share, last = std::min(read_end, first + share);
      for (int64_t image = 0; image < blk.images; ++image) {
        const float* ahead = x_block + image * image_stride + (c + kPrefetchChannels) * plane;
        for (int64_t q = first; q < last; q += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(ahead + q), _MM_HINT_T0);
        }
      }
    }
    float* out = tile + (kk - k_begin) * row_width;
    if constexpr (kFull) {
      reader.copy_full(x_block + c * plane, tap, out);
    } else {
      const int64_t dy = tap / s.kw, dx = tap % s.kw;
      for (int64_t image = 0; image < blk.images; ++image) {
        reader.copy(x_block + image * image_stride + c * plane, tap, dy, dx, out + image * blk.vectors * 16);
      }
    }
    if (++tap == taps) {
      tap = 0;
      ++c;
    }
  }
}

// tile[k - k_begin][image][vector] for k in [k_begin, k_end) of block blk, whose images start
// at x_block; [read_begin, read_end) is the reader's read_range.
template <int64_t kMaxVectors>
void build_tile(const ConvShape& s, const BlockReader<kMaxVectors>& reader, const Block& blk, const float* x_block,
                int64_t k_begin, int64_t k_end, int64_t read_begin, int64_t read_end, float* tile) {
  // A block's first channels have no earlier taps to prefetch them: all of their inputs at
  // once.
  if (k_begin == 0) {
    const int64_t plane = s.height * s.width, image_stride = s.channels * plane;
    for (int64_t image = 0; image < blk.images; ++image) {
      for (int64_t ahead = 0; ahead < std::min(kPrefetchChannels, s.channels); ++ahead) {
        const float* start = x_block + image * image_stride + ahead * plane;
        for (int64_t q = read_begin; q < read_end; q += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(start + q), _MM_HINT_T0);
        }
      }
    }
  }
  if (blk.images == 1 && blk.vectors == kMaxVectors && reader.contiguous()) {
    build_rows<true>(s, reader, blk, x_block, k_begin, k_end, read_begin, read_end, tile);
  } else {
    build_rows<false>(s, reader, blk, x_block, k_begin, k_end, read_begin, read_end, tile);
  }
}

#pragma GCC pop_options
#endif  // DYNASPARSE_X86

}  // namespace dynasparse
