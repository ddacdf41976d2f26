// Bitmask layout kernels: bool (rows, k) <-> uint32 words (rows, ceil(k / 32)), bit j of
// word w holding element 32 * w + j of its row, tail bits zero. Plain CUDA over raw
// pointers and a stream, no torch headers, so this compiles against any torch build.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dynasparse::cuda {

// Both launch asynchronously on `stream` and return the launch error, if any.
cudaError_t pack_mask(const bool* mask, uint32_t* packed, int64_t rows, int64_t k, cudaStream_t stream);
cudaError_t unpack_mask(const uint32_t* packed, bool* mask, int64_t rows, int64_t k, cudaStream_t stream);

}  // namespace dynasparse::cuda
