// Top-k mask kernels: exact, deterministic top-k over one tensor or a list of tensors by radix
// select, and N:M masks. Plain CUDA over raw pointers and a stream, no torch headers.
//
// Scores are read as their bit patterns and mapped to order-preserving unsigned keys (-0.0 is
// folded onto +0.0 first, NaN is counted, never ranked). Radix select then runs one histogram
// pass per 8-bit digit (8 for float64, 4 for float32, 2 for float16 and bfloat16); a one-block
// kernel after each pass picks the digit holding the k-th key and narrows the prefix, all on the
// device, and the last one writes the threshold. The mask
// pass keeps key > kth, and of the keys == kth the first (k - count greater) in flat order
// (tensor order first): per-tile counts of equal keys and an exclusive scan over them make that
// order deterministic. Extra memory: the workspace below, O(tensors + tiles), no copy of scores.
//
// Host synchronization: exactly one per call. `topk_first_pass` copies the NaN counts and the
// first histogram to the host and waits for them, because NaN and k > candidates must be raised
// as errors by the caller; everything after it (`topk_finish`) is asynchronous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace dynasparse::cuda {

enum class ScoreFormat { kFloat64, kFloat32, kFloat16, kBFloat16 };

constexpr int kRadixBins = 256;

// A list of scores tensors (contiguous, one format); candidates[i] may be nullptr (all of tensor i).
struct TopkInputs {
  const void* const* scores;
  const bool* const* candidates;
  const int64_t* numels;
  int64_t count;
};

// Bytes of device workspace `topk_first_pass` and `topk_finish` need for these inputs.
size_t topk_workspace_bytes(const TopkInputs& inputs, ScoreFormat format);

// What the first pass found, on the host: NaN candidates per tensor and non-NaN candidates in all.
struct TopkFirstPass {
  std::vector<uint64_t> nan_counts;
  uint64_t candidates = 0;
};

// First histogram pass plus the NaN count; synchronizes `stream` to return its result.
cudaError_t topk_first_pass(const TopkInputs& inputs, ScoreFormat format, void* workspace, cudaStream_t stream,
                            TopkFirstPass* result);

// Completes the selection after `topk_first_pass` on the same workspace, for
// 1 <= k <= result.candidates: writes masks[i] (numels[i] bools each) and the threshold (one
// element of the scores' format). Asynchronous.
cudaError_t topk_finish(const TopkInputs& inputs, ScoreFormat format, int64_t k, void* workspace,
                        bool* const* masks, void* threshold, cudaStream_t stream);

// N:M mask over `numel` contiguous scores whose last dimension is a multiple of m (1 <= m,
// 0 <= n <= m): in every group of m consecutive scores the n largest are kept (ties: lower
// index). One thread per score ranks it against its group, O(m) work per score: meant for the
// small m of N:M sparsity (2:4, 4:8, ...). `nan_flag` is one int32 of device scratch.
// Synchronizes `stream` once, to report whether a NaN was seen.
cudaError_t nm_mask(const void* scores, ScoreFormat format, int64_t numel, int64_t n, int64_t m, bool* mask,
                    int32_t* nan_flag, cudaStream_t stream, bool* has_nan);

}  // namespace dynasparse::cuda
