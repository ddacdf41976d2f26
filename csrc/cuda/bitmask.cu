// Bitmask layout kernels (see bitmask.cuh).
#include "bitmask.cuh"

namespace dynasparse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// One warp per output word: lane j loads element 32 * w + j (coalesced) and the
// ballot assembles the word, so no thread loops over bits.
__global__ void pack_mask_kernel(const bool* __restrict__ mask, uint32_t* __restrict__ packed,
                                 int64_t rows, int64_t k, int64_t words_per_row) {
  const int64_t total_words = rows * words_per_row;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t word = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       word < total_words; word += warps_in_grid) {
    const int64_t row = word / words_per_row;
    const int64_t column = (word % words_per_row) * kWarp + lane;
    const bool bit = column < k && mask[row * k + column];
    const uint32_t bits = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) packed[word] = bits;
  }
}

__global__ void unpack_mask_kernel(const uint32_t* __restrict__ packed, bool* __restrict__ mask,
                                   int64_t rows, int64_t k, int64_t words_per_row) {
  const int64_t total = rows * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += stride) {
    const int64_t row = index / k;
    const int64_t column = index % k;
    mask[index] = (packed[row * words_per_row + column / kWarp] >> (column % kWarp)) & 1u;
  }
}

// Grid-stride loops keep the grid bounded for huge tensors.
int grid_for(int64_t threads_needed) {
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace

cudaError_t pack_mask(const bool* mask, uint32_t* packed, int64_t rows, int64_t k, cudaStream_t stream) {
  const int64_t words_per_row = (k + kWarp - 1) / kWarp;
  if (rows == 0 || words_per_row == 0) return cudaSuccess;
  pack_mask_kernel<<<grid_for(rows * words_per_row * kWarp), kThreads, 0, stream>>>(mask, packed, rows, k,
                                                                                    words_per_row);
  return cudaGetLastError();
}

cudaError_t unpack_mask(const uint32_t* packed, bool* mask, int64_t rows, int64_t k, cudaStream_t stream) {
  const int64_t words_per_row = (k + kWarp - 1) / kWarp;
  if (rows == 0 || k == 0) return cudaSuccess;
  unpack_mask_kernel<<<grid_for(rows * k), kThreads, 0, stream>>>(packed, mask, rows, k, words_per_row);
  return cudaGetLastError();
}

}  // namespace dynasparse::cuda
