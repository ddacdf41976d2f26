// Argument checks and shapes of the bitmask ops, shared by the CPU and CUDA bindings
// so both backends reject bad input with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace dynasparse {

constexpr int64_t kBitsPerWord = 32;

inline int64_t words_per_row(int64_t k) { return (k + kBitsPerWord - 1) / kBitsPerWord; }

inline std::vector<int64_t> packed_sizes(const at::Tensor& mask) {
  std::vector<int64_t> sizes(mask.sizes().begin(), mask.sizes().end());
  sizes.back() = words_per_row(sizes.back());
  return sizes;
}

inline void check_pack_mask(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool,
              "dynasparse.pack_mask: mask must be torch.bool, got ", mask.scalar_type(),
              " (masks are explicit bool tensors; never derive one from weight == 0)");
  TORCH_CHECK_VALUE(mask.dim() >= 1, "dynasparse.pack_mask: mask must have at least one dimension "
              "(packing runs along the last one), got a 0-d tensor");
}

inline void check_unpack_mask(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kInt,
              "dynasparse.unpack_mask: packed must be torch.int32 (as returned by pack_mask), got ",
              packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1, "dynasparse.unpack_mask: packed must have at least one dimension");
  TORCH_CHECK_VALUE(k >= 0, "dynasparse.unpack_mask: k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(packed.size(-1) == words_per_row(k), "dynasparse.unpack_mask: a row of ", k,
              " mask elements packs into ", words_per_row(k), " int32 words, but packed has ",
              packed.size(-1), " in its last dimension");
}

inline std::vector<int64_t> unpacked_sizes(const at::Tensor& packed, int64_t k) {
  std::vector<int64_t> sizes(packed.sizes().begin(), packed.sizes().end());
  sizes.back() = k;
  return sizes;
}

}  // namespace dynasparse
