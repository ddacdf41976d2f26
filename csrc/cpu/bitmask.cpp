// CPU kernels of the bitmask layout: bool (..., K) <-> int32 words (..., ceil(K / 32)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>

#include "bitmask.h"
#include "parallel.h"

namespace dynasparse {
namespace {

// Eight bool bytes (each 0 or 1) -> eight bits, element i at bit i: the multiply
// moves byte i's low bit to bit 56 + i without carries reaching the top byte.
inline uint32_t pack_byte_lanes(const uint8_t* bytes) {
  uint64_t lanes;
  std::memcpy(&lanes, bytes, sizeof(lanes));
  lanes &= 0x0101010101010101ULL;
  return static_cast<uint32_t>((lanes * 0x0102040810204080ULL) >> 56);
}

// Bits of one byte -> eight bool bytes. A table, because the inverse multiply trick
// collides (7 * j + i is not unique) and its carries corrupt neighbouring lanes.
constexpr std::array<uint64_t, 256> make_byte_spread_table() {
  std::array<uint64_t, 256> table{};
  for (int bits = 0; bits < 256; ++bits) {
    uint64_t lanes = 0;
    for (int i = 0; i < 8; ++i) lanes |= static_cast<uint64_t>((bits >> i) & 1) << (8 * i);
    table[bits] = lanes;
  }
  return table;
}
constexpr auto kByteSpread = make_byte_spread_table();

// Cheap per-word work: let each thread take at least this many words.
constexpr int64_t kWordsPerTask = 4096;

at::Tensor pack_mask_cpu(const at::Tensor& mask_in) {
  check_pack_mask(mask_in);
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor packed = at::empty(packed_sizes(mask), mask.options().dtype(at::kInt));
  const int64_t k = mask.size(-1);
  const int64_t words = words_per_row(k);
  const int64_t rows = k == 0 ? 0 : mask.numel() / k;
  if (packed.numel() == 0) return packed;
  const auto* src = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());

  parallel_for(0, rows * words, kWordsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / words;
      const int64_t first = (index % words) * kBitsPerWord;
      const uint8_t* bytes = src + row * k + first;
      const int64_t count = std::min<int64_t>(kBitsPerWord, k - first);
      uint32_t word = 0;
      if (count == kBitsPerWord) {
        for (int lane = 0; lane < 4; ++lane) word |= pack_byte_lanes(bytes + 8 * lane) << (8 * lane);
      } else {
        for (int64_t j = 0; j < count; ++j) word |= static_cast<uint32_t>(bytes[j] != 0) << j;
      }
      dst[index] = word;
    }
  });
  return packed;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed_in, int64_t k) {
  check_unpack_mask(packed_in, k);
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor mask = at::empty(unpacked_sizes(packed, k), packed.options().dtype(at::kBool));
  if (mask.numel() == 0) return mask;
  const int64_t words = packed.size(-1);
  const int64_t rows = mask.numel() / k;
  const auto* src = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  auto* dst = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());

  parallel_for(0, rows * words, kWordsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / words;
      const int64_t first = (index % words) * kBitsPerWord;
      const uint32_t word = src[index];
      uint8_t* bytes = dst + row * k + first;
      const int64_t count = std::min<int64_t>(kBitsPerWord, k - first);
      if (count == kBitsPerWord) {
        for (int lane = 0; lane < 4; ++lane) {
          const uint64_t lanes = kByteSpread[(word >> (8 * lane)) & 0xFF];
          std::memcpy(bytes + 8 * lane, &lanes, sizeof(lanes));
        }
      } else {
        for (int64_t j = 0; j < count; ++j) bytes[j] = static_cast<uint8_t>((word >> j) & 1U);
      }
    }
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
}

}  // namespace dynasparse
