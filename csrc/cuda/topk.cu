// Top-k mask kernels (see topk.cuh for the algorithm and its one host synchronization).
#include "topk.cuh"

#include <algorithm>

namespace dynasparse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kItemsPerThread = 16;
constexpr int64_t kTile = int64_t{kThreads} * kItemsPerThread;
constexpr int kDigitBits = 8;
// Tensors per launch: their pointers travel in the kernel parameters (32 bytes each, well
// under the 4 KiB parameter limit), so a list needs no device copy of its pointer table.
constexpr int kMaxSegments = 64;
constexpr int kScanThreads = 1024;

// Bit layouts. Keys (uint64 for every format) are ordered like the scores: the sign bit is
// flipped for positives and every bit for negatives; -0.0 is first turned into +0.0 so the two tie.
template <class BitsT, uint64_t kInfinityBits>
struct Format {
  using Bits = BitsT;
  static constexpr int kBits = 8 * sizeof(Bits);
  static constexpr uint64_t kSign = uint64_t{1} << (kBits - 1);
  static constexpr uint64_t kAll = kSign | (kSign - 1);

  __device__ static bool is_nan(Bits bits) { return (uint64_t{bits} & (kSign - 1)) > kInfinityBits; }
  __device__ static uint64_t key(Bits bits) {
    uint64_t u = bits;
    if (u == kSign) u = 0;
    return (u & kSign) ? (~u & kAll) : (u | kSign);
  }
  __device__ static Bits decode(uint64_t key) {
    return static_cast<Bits>((key & kSign) ? (key ^ kSign) : (~key & kAll));
  }
};
using Float64 = Format<uint64_t, 0x7FF0000000000000ull>;
using Float32 = Format<uint32_t, 0x7F800000u>;
using Float16 = Format<uint16_t, 0x7C00u>;
using BFloat16 = Format<uint16_t, 0x7F80u>;

template <class F>
constexpr int passes() { return F::kBits / kDigitBits; }

// Up to kMaxSegments tensors seen as one flat index range [0, offsets[count]).
struct SegmentBatch {
  const void* scores[kMaxSegments];
  const bool* candidates[kMaxSegments];
  bool* masks[kMaxSegments];
  int64_t offsets[kMaxSegments + 1];
  int count;
  int first_tensor;   // index of scores[0] in the whole list
  int64_t tile_base;  // index of this batch's first tile among all tiles
};

// The selection so far: the high digits of the k-th key, how many keys below that prefix are
// still to be kept, and (after the last digit) how many keys equal the k-th.
struct SelectState {
  unsigned long long prefix;
  unsigned long long remaining;
  unsigned long long equal_total;
};

// Element `index` of the batch: the thread's segment cursor only moves forward, because each
// thread visits increasing indices.
struct Cursor {
  int segment = 0;
  __device__ int64_t local(const SegmentBatch& batch, int64_t index) {
    while (index >= batch.offsets[segment + 1]) ++segment;
    return index - batch.offsets[segment];
  }
};

template <class F>
__device__ typename F::Bits load_bits(const SegmentBatch& batch, int segment, int64_t local) {
  return static_cast<const typename F::Bits*>(batch.scores[segment])[local];
}

__device__ bool is_candidate(const SegmentBatch& batch, int segment, int64_t local) {
  const bool* candidates = batch.candidates[segment];
  return candidates == nullptr || candidates[local];
}

// The number of `flag`s set in threads before this one, and in the whole block (all threads call it).
__device__ uint32_t block_exclusive_count(bool flag, uint32_t* warp_totals, uint32_t* block_total) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const uint32_t ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_totals[warp] = __popc(ballot);
  __syncthreads();
  uint32_t before = __popc(ballot & ((1u << lane) - 1u));
  uint32_t total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_totals[w] : 0u;
    total += warp_totals[w];
  }
  __syncthreads();  // warp_totals is reused by the next call
  *block_total = total;
  return before;
}

// One radix pass: histogram of the digit at `shift` over candidate keys whose higher digits
// equal the selected prefix (every key on the first pass, which also counts NaNs per tensor).
template <class F, bool kFirstPass>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const __grid_constant__ SegmentBatch batch, const SelectState* __restrict__ state, int shift,
                     unsigned long long* __restrict__ histogram, unsigned long long* __restrict__ nan_counts) {
  __shared__ uint32_t block_histogram[kRadixBins];
  for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) block_histogram[bin] = 0;
  __syncthreads();
  const uint64_t prefix_high = kFirstPass ? 0 : (state->prefix >> (shift + kDigitBits));
  const int64_t total = batch.offsets[batch.count];
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  Cursor cursor;
#pragma unroll 4
  for (int item = 0; item < kItemsPerThread; ++item) {
    const int64_t index = tile_start + item * kThreads + threadIdx.x;
    if (index >= total) break;
    const int64_t local = cursor.local(batch, index);
    if (!is_candidate(batch, cursor.segment, local)) continue;
    const auto bits = load_bits<F>(batch, cursor.segment, local);
    if (F::is_nan(bits)) {
      if (kFirstPass) atomicAdd(&nan_counts[batch.first_tensor + cursor.segment], 1ull);
      continue;
    }
    const uint64_t key = F::key(bits);
    // The first pass never shifts: by shift + 8 = 64 would be undefined for float64.
    if (kFirstPass || (key >> (shift + kDigitBits)) == prefix_high) {
      atomicAdd(&block_histogram[(key >> shift) & (kRadixBins - 1)], 1u);
    }
  }
  __syncthreads();
  for (int bin = threadIdx.x; bin < kRadixBins; bin += kThreads) {
    if (block_histogram[bin] != 0) atomicAdd(&histogram[bin], block_histogram[bin]);
  }
}

__global__ void init_state_kernel(SelectState* state, unsigned long long k) {
  *state = SelectState{0, k, 0};
}

// One block of kRadixBins threads: thread d owns digit d. The digit holding the remaining-th
// largest key is the one whose keys above it are fewer than `remaining` and whose keys at or
// above it are at least `remaining`; exactly one digit satisfies that.
template <class F>
__global__ void __launch_bounds__(kRadixBins)
    select_digit_kernel(const unsigned long long* __restrict__ histogram, SelectState* state, int shift,
                        typename F::Bits* threshold) {
  __shared__ unsigned long long at_or_above[kRadixBins];
  const int digit = threadIdx.x;
  const unsigned long long remaining = state->remaining;
  const unsigned long long count = histogram[digit];
  at_or_above[digit] = count;
  __syncthreads();
  // Inclusive suffix sums, Hillis-Steele: log2(256) steps.
  for (int step = 1; step < kRadixBins; step *= 2) {
    const unsigned long long add = digit + step < kRadixBins ? at_or_above[digit + step] : 0;
    __syncthreads();
    at_or_above[digit] += add;
    __syncthreads();
  }
  const unsigned long long above = at_or_above[digit] - count;
  if (above < remaining && remaining <= at_or_above[digit]) {
    const unsigned long long prefix = state->prefix | (static_cast<unsigned long long>(digit) << shift);
    state->prefix = prefix;
    state->remaining = remaining - above;
    if (shift == 0) {
      state->equal_total = count;
      *threshold = F::decode(prefix);
    }
  }
}

// When every key equal to the k-th is kept, flat order does not matter and the tie passes
// return at once; only a tie straddling the k-th position pays for them.
__device__ bool all_ties_kept(const SelectState* state) { return state->equal_total == state->remaining; }

template <class F>
__global__ void __launch_bounds__(kThreads)
    count_equal_kernel(const __grid_constant__ SegmentBatch batch, const SelectState* __restrict__ state,
                       unsigned long long* __restrict__ tile_counts) {
  __shared__ uint32_t warp_totals[kWarps];
  if (all_ties_kept(state)) return;
  const uint64_t kth = state->prefix;
  const int64_t total = batch.offsets[batch.count];
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  Cursor cursor;
  uint32_t equal = 0;
  for (int item = 0; item < kItemsPerThread; ++item) {
    const int64_t index = tile_start + item * kThreads + threadIdx.x;
    if (index >= total) break;
    const int64_t local = cursor.local(batch, index);
    equal += is_candidate(batch, cursor.segment, local) && F::key(load_bits<F>(batch, cursor.segment, local)) == kth;
  }
  // Counts up to kTile: sum them through the block's warp totals.
  for (int offset = kWarp / 2; offset > 0; offset /= 2) equal += __shfl_down_sync(0xffffffffu, equal, offset);
  if (threadIdx.x % kWarp == 0) warp_totals[threadIdx.x / kWarp] = equal;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t block_equal = 0;
    for (int w = 0; w < kWarps; ++w) block_equal += warp_totals[w];
    tile_counts[batch.tile_base + blockIdx.x] = block_equal;
  }
}

// In-place exclusive scan of the per-tile counts, one block walking them in chunks.
__global__ void __launch_bounds__(kScanThreads)
    exclusive_scan_kernel(unsigned long long* values, int64_t count, const SelectState* state) {
  __shared__ unsigned long long chunk[kScanThreads];
  if (all_ties_kept(state)) return;
  unsigned long long carry = 0;
  for (int64_t start = 0; start < count; start += kScanThreads) {
    const int64_t index = start + threadIdx.x;
    const unsigned long long value = index < count ? values[index] : 0;
    chunk[threadIdx.x] = value;
    __syncthreads();
    for (int step = 1; step < kScanThreads; step *= 2) {
      const unsigned long long add = threadIdx.x >= step ? chunk[threadIdx.x - step] : 0;
      __syncthreads();
      chunk[threadIdx.x] += add;
      __syncthreads();
    }
    if (index < count) values[index] = carry + chunk[threadIdx.x] - value;
    carry += chunk[kScanThreads - 1];
    __syncthreads();
  }
}

template <class F>
__global__ void __launch_bounds__(kThreads)
    write_mask_kernel(const __grid_constant__ SegmentBatch batch, const SelectState* __restrict__ state,
                      const unsigned long long* __restrict__ tile_offsets) {
  __shared__ uint32_t warp_totals[kWarps];
  const uint64_t kth = state->prefix;
  const unsigned long long remaining = state->remaining;
  const bool all_kept = all_ties_kept(state);  // uniform over the block
  const int64_t total = batch.offsets[batch.count];
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile;
  // Equal keys of this tile seen so far, starting from those of all earlier tiles.
  unsigned long long equal_before = all_kept ? 0 : tile_offsets[batch.tile_base + blockIdx.x];
  Cursor cursor;
  for (int item = 0; item < kItemsPerThread; ++item) {
    const int64_t index = tile_start + item * kThreads + threadIdx.x;
    const bool valid = index < total;
    if (all_kept && !valid) break;
    int64_t local = 0;
    bool greater = false;
    bool equal = false;
    if (valid) {
      local = cursor.local(batch, index);
      if (is_candidate(batch, cursor.segment, local)) {
        const uint64_t key = F::key(load_bits<F>(batch, cursor.segment, local));
        greater = key > kth;
        equal = key == kth;
      }
    }
    bool keep = greater || (equal && all_kept);
    if (!all_kept) {
      uint32_t block_equal;
      const uint32_t rank = block_exclusive_count(equal, warp_totals, &block_equal);
      keep = greater || (equal && equal_before + rank < remaining);
      equal_before += block_equal;
    }
    if (valid) batch.masks[cursor.segment][local] = keep;
  }
}

template <class F>
__global__ void __launch_bounds__(kThreads)
    nm_mask_kernel(const typename F::Bits* __restrict__ scores, int64_t numel, int64_t n, int64_t m,
                   bool* __restrict__ mask, int32_t* __restrict__ nan_flag) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < numel;
       index += stride) {
    const int64_t position = index % m;
    const typename F::Bits* group = scores + (index - position);
    const auto bits = group[position];
    if (F::is_nan(bits)) *nan_flag = 1;
    const uint64_t key = F::key(bits);
    // The rank of this score in its group: larger scores, and equal ones at lower positions.
    int64_t rank = 0;
    for (int64_t other = 0; other < m && rank < n; ++other) {
      const uint64_t other_key = F::key(group[other]);
      rank += other_key > key || (other_key == key && other < position);
    }
    mask[index] = rank < n;
  }
}

struct Batching {
  std::vector<SegmentBatch> batches;
  int64_t tiles = 0;
};

Batching make_batches(const TopkInputs& inputs, bool* const* masks) {
  Batching result;
  for (int64_t first = 0; first < inputs.count; first += kMaxSegments) {
    SegmentBatch batch{};
    batch.count = static_cast<int>(std::min<int64_t>(kMaxSegments, inputs.count - first));
    batch.first_tensor = static_cast<int>(first);
    batch.tile_base = result.tiles;
    for (int i = 0; i < batch.count; ++i) {
      batch.scores[i] = inputs.scores[first + i];
      batch.candidates[i] = inputs.candidates[first + i];
      batch.masks[i] = masks == nullptr ? nullptr : masks[first + i];
      batch.offsets[i + 1] = batch.offsets[i] + inputs.numels[first + i];
    }
    result.tiles += (batch.offsets[batch.count] + kTile - 1) / kTile;
    result.batches.push_back(batch);
  }
  return result;
}

int tiles_of(const SegmentBatch& batch) { return static_cast<int>((batch.offsets[batch.count] + kTile - 1) / kTile); }

// Workspace layout, in 8-byte words: NaN counts per tensor, then one histogram per pass (the
// NaN counts and the first histogram are adjacent so one copy brings both to the host), then
// the select state, then the per-tile equal counts.
struct Workspace {
  unsigned long long* nan_counts;
  unsigned long long* histograms;
  SelectState* state;
  unsigned long long* tile_counts;

  Workspace(void* base, int64_t tensors, int passes) {
    auto* words = static_cast<unsigned long long*>(base);
    nan_counts = words;
    histograms = nan_counts + tensors;
    state = reinterpret_cast<SelectState*>(histograms + int64_t{passes} * kRadixBins);
    tile_counts = reinterpret_cast<unsigned long long*>(state + 1);
  }
  size_t zeroed_bytes(int64_t tensors, int passes) const {
    return (tensors + int64_t{passes} * kRadixBins) * sizeof(unsigned long long);
  }
};

int passes_of(ScoreFormat format) {
  switch (format) {
    case ScoreFormat::kFloat64: return passes<Float64>();
    case ScoreFormat::kFloat32: return passes<Float32>();
    default: return passes<Float16>();
  }
}

template <class F>
cudaError_t first_pass(const TopkInputs& inputs, void* workspace_base, cudaStream_t stream, TopkFirstPass* result) {
  const Workspace workspace(workspace_base, inputs.count, passes<F>());
  cudaError_t status = cudaMemsetAsync(workspace_base, 0, workspace.zeroed_bytes(inputs.count, passes<F>()), stream);
  if (status != cudaSuccess) return status;
  for (const SegmentBatch& batch : make_batches(inputs, nullptr).batches) {
    if (tiles_of(batch) == 0) continue;
    histogram_kernel<F, true><<<tiles_of(batch), kThreads, 0, stream>>>(
        batch, workspace.state, F::kBits - kDigitBits, workspace.histograms, workspace.nan_counts);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  std::vector<unsigned long long> host(inputs.count + kRadixBins);
  status = cudaMemcpyAsync(host.data(), workspace.nan_counts, host.size() * sizeof(unsigned long long),
                           cudaMemcpyDeviceToHost, stream);
  if (status != cudaSuccess) return status;
  if ((status = cudaStreamSynchronize(stream)) != cudaSuccess) return status;
  result->nan_counts.assign(host.begin(), host.begin() + inputs.count);
  result->candidates = 0;
  for (int bin = 0; bin < kRadixBins; ++bin) result->candidates += host[inputs.count + bin];
  return cudaSuccess;
}

template <class F>
cudaError_t finish(const TopkInputs& inputs, int64_t k, void* workspace_base, bool* const* masks, void* threshold,
                   cudaStream_t stream) {
  const Workspace workspace(workspace_base, inputs.count, passes<F>());
  const Batching batching = make_batches(inputs, masks);
  auto* threshold_bits = static_cast<typename F::Bits*>(threshold);
  init_state_kernel<<<1, 1, 0, stream>>>(workspace.state, static_cast<unsigned long long>(k));
  cudaError_t status = cudaGetLastError();
  for (int pass = 0; pass < passes<F>() && status == cudaSuccess; ++pass) {
    const int shift = F::kBits - kDigitBits * (pass + 1);
    unsigned long long* histogram = workspace.histograms + int64_t{pass} * kRadixBins;
    // The first pass's histogram is already there (topk_first_pass).
    for (const SegmentBatch& batch : batching.batches) {
      if (pass == 0 || tiles_of(batch) == 0) continue;
      histogram_kernel<F, false><<<tiles_of(batch), kThreads, 0, stream>>>(batch, workspace.state, shift, histogram,
                                                                           workspace.nan_counts);
      if ((status = cudaGetLastError()) != cudaSuccess) return status;
    }
    select_digit_kernel<F><<<1, kRadixBins, 0, stream>>>(histogram, workspace.state, shift, threshold_bits);
    status = cudaGetLastError();
  }
  if (status != cudaSuccess) return status;
  for (const SegmentBatch& batch : batching.batches) {
    if (tiles_of(batch) == 0) continue;
    count_equal_kernel<F><<<tiles_of(batch), kThreads, 0, stream>>>(batch, workspace.state, workspace.tile_counts);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(workspace.tile_counts, batching.tiles, workspace.state);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  for (const SegmentBatch& batch : batching.batches) {
    if (tiles_of(batch) == 0) continue;
    write_mask_kernel<F><<<tiles_of(batch), kThreads, 0, stream>>>(batch, workspace.state, workspace.tile_counts);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <class F>
cudaError_t nm(const void* scores, int64_t numel, int64_t n, int64_t m, bool* mask, int32_t* nan_flag,
               cudaStream_t stream, bool* has_nan) {
  cudaError_t status = cudaMemsetAsync(nan_flag, 0, sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  if (numel > 0) {
    const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{65535} * 8);
    nm_mask_kernel<F><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        static_cast<const typename F::Bits*>(scores), numel, n, m, mask, nan_flag);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  int32_t flag = 0;
  status = cudaMemcpyAsync(&flag, nan_flag, sizeof(flag), cudaMemcpyDeviceToHost, stream);
  if (status != cudaSuccess) return status;
  if ((status = cudaStreamSynchronize(stream)) != cudaSuccess) return status;
  *has_nan = flag != 0;
  return cudaSuccess;
}

}  // namespace

size_t topk_workspace_bytes(const TopkInputs& inputs, ScoreFormat format) {
  const int64_t tiles = make_batches(inputs, nullptr).tiles;
  return (inputs.count + int64_t{passes_of(format)} * kRadixBins + tiles) * sizeof(unsigned long long) +
         sizeof(SelectState);
}

cudaError_t topk_first_pass(const TopkInputs& inputs, ScoreFormat format, void* workspace, cudaStream_t stream,
                            TopkFirstPass* result) {
  switch (format) {
    case ScoreFormat::kFloat64: return first_pass<Float64>(inputs, workspace, stream, result);
    case ScoreFormat::kFloat32: return first_pass<Float32>(inputs, workspace, stream, result);
    case ScoreFormat::kFloat16: return first_pass<Float16>(inputs, workspace, stream, result);
    case ScoreFormat::kBFloat16: return first_pass<BFloat16>(inputs, workspace, stream, result);
  }
  return cudaErrorInvalidValue;
}

cudaError_t topk_finish(const TopkInputs& inputs, ScoreFormat format, int64_t k, void* workspace,
                        bool* const* masks, void* threshold, cudaStream_t stream) {
  switch (format) {
    case ScoreFormat::kFloat64: return finish<Float64>(inputs, k, workspace, masks, threshold, stream);
    case ScoreFormat::kFloat32: return finish<Float32>(inputs, k, workspace, masks, threshold, stream);
    case ScoreFormat::kFloat16: return finish<Float16>(inputs, k, workspace, masks, threshold, stream);
    case ScoreFormat::kBFloat16: return finish<BFloat16>(inputs, k, workspace, masks, threshold, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nm_mask(const void* scores, ScoreFormat format, int64_t numel, int64_t n, int64_t m, bool* mask,
                    int32_t* nan_flag, cudaStream_t stream, bool* has_nan) {
  switch (format) {
    case ScoreFormat::kFloat64: return nm<Float64>(scores, numel, n, m, mask, nan_flag, stream, has_nan);
    case ScoreFormat::kFloat32: return nm<Float32>(scores, numel, n, m, mask, nan_flag, stream, has_nan);
    case ScoreFormat::kFloat16: return nm<Float16>(scores, numel, n, m, mask, nan_flag, stream, has_nan);
    case ScoreFormat::kBFloat16: return nm<BFloat16>(scores, numel, n, m, mask, nan_flag, stream, has_nan);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dynasparse::cuda
