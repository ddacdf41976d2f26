// Masked matmul kernels (see matmul.cuh for the algorithms and the one host synchronization
// of plan building).
#include "matmul.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>
#include <cub/device/device_scan.cuh>

namespace dynasparse::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
// Rows per warp: one per lane, which holds that row's segment cursor.
constexpr int kRowsPerWarp = kWarp;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
// Staged x per CTA; two CTAs fit an SM's shared memory on sm_80 and sm_90.
constexpr int kSlabBytes = 96 * 1024;
constexpr int64_t kMaxGrid = int64_t{1} << 20;

// For a >= 0, b >= 1, without overflowing on huge b.
__host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : 1 + (a - 1) / b; }

int grid_for(int64_t blocks) { return static_cast<int>(std::min(blocks, kMaxGrid)); }

// --- plans -------------------------------------------------------------------------------

// Segment s of a plan with `panel`-wide panels over `rows` rows: row s % rows, columns
// [lo, hi) of panel s / rows.
struct Segment {
  int64_t row;
  int64_t lo;
  int64_t hi;
};

__device__ Segment segment_of(int64_t s, int64_t rows, int64_t cols, int64_t panel) {
  const int64_t lo = (s / rows) * panel;
  return {s % rows, lo, lo + panel < cols ? lo + panel : cols};
}

__device__ bool mask_at(const BoolMatrix& mask, int64_t row, int64_t col) {
  return mask.data[row * mask.row_stride + col * mask.col_stride];
}

// Warp per segment: row_ptr[1 + s] = set elements of segment s.
__global__ void __launch_bounds__(kThreads)
    count_kernel(const BoolMatrix mask, int64_t panel, int64_t segments, int64_t* __restrict__ row_ptr) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp; s < segments;
       s += warps_in_grid) {
    const Segment segment = segment_of(s, mask.rows, mask.cols, panel);
    int64_t count = 0;
    for (int64_t base = segment.lo; base < segment.hi; base += kWarp) {
      const int64_t col = base + lane;
      count += __popc(__ballot_sync(kFullMask, col < segment.hi && mask_at(mask, segment.row, col)));
    }
    if (lane == 0) row_ptr[1 + s] = count;
  }
}

// Warp per segment, the same ballots as count_kernel: set lanes write their offsets in column order.
template <class Index>
__global__ void __launch_bounds__(kThreads)
    fill_kernel(const BoolMatrix mask, int64_t panel, int64_t segments, const int64_t* __restrict__ row_ptr,
                Index* __restrict__ cols) {
  const int lane = threadIdx.x % kWarp;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp; s < segments;
       s += warps_in_grid) {
    const Segment segment = segment_of(s, mask.rows, mask.cols, panel);
    int64_t position = row_ptr[s];
    for (int64_t base = segment.lo; base < segment.hi; base += kWarp) {
      const int64_t col = base + lane;
      const bool set = col < segment.hi && mask_at(mask, segment.row, col);
      const unsigned ballot = __ballot_sync(kFullMask, set);
      // Offsets inside a panel are < 65536: int16 keeps their low 16 bits (see csrc/ops.cpp).
      if (set) {
        cols[position + __popc(ballot & lanes_below)] =
            static_cast<Index>(static_cast<typename std::make_unsigned<Index>::type>(col - segment.lo));
      }
      position += __popc(ballot);
    }
  }
}

// occupied[(r / b) * block_cols + c / b] = 1 for every set mask element, visiting the mask in
// memory order (rows or columns fastest, whichever stride is smaller).
__global__ void occupancy_kernel(const BoolMatrix mask, int64_t block, int64_t block_cols, bool columns_fastest,
                                 bool* __restrict__ occupied) {
  const int64_t total = mask.rows * mask.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t row = columns_fastest ? e / mask.cols : e % mask.rows;
    const int64_t col = columns_fastest ? e % mask.cols : e / mask.rows;
    if (mask_at(mask, row, col)) {
      bool* flag = occupied + (row / block) * block_cols + col / block;
      if (!*flag) *flag = true;  // every writer stores the same value: the race is benign
    }
  }
}

int64_t segments_of(const BoolMatrix& mask, int64_t panel) { return ceil_div(mask.cols, panel) * mask.rows; }

int warp_grid(int64_t segments) { return grid_for(ceil_div(segments, kWarps)); }

size_t scan_bytes(int64_t segments) {
  size_t bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<int64_t*>(nullptr), segments);
  return bytes;
}

// row_ptr of a panel plan of `mask` and its total, copied to the host (the one sync).
cudaError_t count_and_scan(const BoolMatrix& mask, int64_t panel, int64_t* row_ptr, void* scan_workspace,
                           size_t scan_workspace_bytes, cudaStream_t stream, int64_t* total) {
  const int64_t segments = segments_of(mask, panel);
  cudaError_t status = cudaMemsetAsync(row_ptr, 0, sizeof(int64_t), stream);
  if (status != cudaSuccess || segments == 0) {
    *total = 0;
    return status;
  }
  count_kernel<<<warp_grid(segments), kThreads, 0, stream>>>(mask, panel, segments, row_ptr);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  status = cub::DeviceScan::InclusiveSum(scan_workspace, scan_workspace_bytes, row_ptr + 1, segments, stream);
  if (status != cudaSuccess) return status;
  status = cudaMemcpyAsync(total, row_ptr + segments, sizeof(int64_t), cudaMemcpyDeviceToHost, stream);
  if (status != cudaSuccess) return status;
  return cudaStreamSynchronize(stream);
}

template <class Index>
cudaError_t fill(const BoolMatrix& mask, int64_t panel, const int64_t* row_ptr, Index* cols, cudaStream_t stream) {
  const int64_t segments = segments_of(mask, panel);
  if (segments == 0) return cudaSuccess;
  fill_kernel<Index><<<warp_grid(segments), kThreads, 0, stream>>>(mask, panel, segments, row_ptr, cols);
  return cudaGetLastError();
}

// Block plans: the byte map of occupied blocks, planned as one panel spanning all block columns.
struct BlockMap {
  bool* occupied;
  int64_t rows;
  int64_t cols;
  size_t bytes;

  BlockMap(void* workspace, int64_t mask_rows, int64_t mask_cols, int64_t block)
      : occupied(static_cast<bool*>(workspace)),
        rows(ceil_div(mask_rows, block)),
        cols(ceil_div(mask_cols, block)),
        // b = 1 plans the mask itself; the scan workspace after the map stays 256-byte aligned.
        bytes(block == 1 ? 0 : static_cast<size_t>(ceil_div(rows * cols, 256) * 256)) {}

  BoolMatrix matrix(const BoolMatrix& mask, int64_t block) const {
    return block == 1 ? mask : BoolMatrix{occupied, rows, cols, cols, 1};
  }
};

// --- plan check --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    check_plan_kernel(const PanelPlan plan, int64_t segments, int64_t nnz, int32_t* __restrict__ flag) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  if (first == 0 && lane == 0 && (plan.row_ptr[0] != 0 || plan.row_ptr[segments] != nnz)) *flag = 1;
  for (int64_t s = first; s < segments; s += warps_in_grid) {
    const int64_t begin = plan.row_ptr[s], end = plan.row_ptr[s + 1];
    // Unsigned compares: a negative begin or end fails them too.
    if (static_cast<uint64_t>(begin) > static_cast<uint64_t>(end) ||
        static_cast<uint64_t>(end) > static_cast<uint64_t>(nnz)) {
      if (lane == 0) *flag = 1;
      continue;
    }
    const int64_t lo = (s / plan.rows) * plan.panel;
    const int64_t width = lo + plan.panel < plan.k ? plan.panel : plan.k - lo;
    bool bad = false;
    for (int64_t i = begin + lane; i < end; i += kWarp) {
      const int64_t offset = static_cast<uint16_t>(plan.cols[i]);
      bad |= offset >= width || (i > begin && offset <= static_cast<uint16_t>(plan.cols[i - 1]));
    }
    if (bad) *flag = 1;
  }
}

// --- values ------------------------------------------------------------------------------

// Calls body(i, row, column) for every plan nonzero, a warp per segment.
template <class Body>
__device__ void for_each_nonzero(const PanelPlan& plan, Body body) {
  const int lane = threadIdx.x % kWarp;
  const int64_t segments = ceil_div(plan.k, plan.panel) * plan.rows;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; s < segments;
       s += warps_in_grid) {
    const int64_t row = s % plan.rows;
    const int64_t panel_lo = (s / plan.rows) * plan.panel;
    const int64_t end = plan.row_ptr[s + 1];
    for (int64_t i = plan.row_ptr[s] + lane; i < end; i += kWarp) {
      body(i, row, panel_lo + static_cast<uint16_t>(plan.cols[i]));
    }
  }
}

template <class Bits>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const Bits* __restrict__ weight, int64_t row_stride, int64_t col_stride, const PanelPlan plan,
                Bits* __restrict__ values) {
  for_each_nonzero(plan, [&](int64_t i, int64_t row, int64_t col) {
    values[i] = weight[row * row_stride + col * col_stride];
  });
}

template <class Bits>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const Bits* __restrict__ values, const PanelPlan plan, Bits* __restrict__ dense) {
  for_each_nonzero(plan, [&](int64_t i, int64_t row, int64_t col) { dense[row * plan.k + col] = values[i]; });
}

template <class Bits>
cudaError_t pack_typed(const void* weight, int64_t row_stride, int64_t col_stride, const PanelPlan& plan,
                       void* values, cudaStream_t stream) {
  const int64_t segments = ceil_div(plan.k, plan.panel) * plan.rows;
  if (segments == 0) return cudaSuccess;
  pack_kernel<Bits><<<warp_grid(segments), kThreads, 0, stream>>>(static_cast<const Bits*>(weight), row_stride,
                                                                  col_stride, plan, static_cast<Bits*>(values));
  return cudaGetLastError();
}

template <class Bits>
cudaError_t unpack_typed(const void* values, const PanelPlan& plan, void* dense, cudaStream_t stream) {
  const int64_t segments = ceil_div(plan.k, plan.panel) * plan.rows;
  if (segments == 0) return cudaSuccess;
  unpack_kernel<Bits><<<warp_grid(segments), kThreads, 0, stream>>>(static_cast<const Bits*>(values), plan,
                                                                    static_cast<Bits*>(dense));
  return cudaGetLastError();
}

// --- products ----------------------------------------------------------------------------

template <class Scalar>
struct Traits;
template <>
struct Traits<float> {
  using Acc = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Traits<double> {
  using Acc = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <>
struct Traits<__half> {
  using Acc = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Traits<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// x staged as slab[column][batch]: lane l reads batch elements [l * kPerLane, (l + 1) * kPerLane)
// of a column as one vector load. Rows are padded by kPerLane elements, which keeps every row
// vector-aligned and spreads the staging stores over more banks.
template <class Scalar, int kPerLaneT>
struct Staging {
  using Acc = typename Traits<Scalar>::Acc;
  static constexpr int kPerLane = kPerLaneT;
  static constexpr int kBatch = kWarp * kPerLane;
  static constexpr int kStride = kBatch + kPerLane;
  static constexpr int kColumns = kSlabBytes / (kStride * static_cast<int>(sizeof(Acc)));
  struct alignas(kPerLane * sizeof(Acc)) Vector {
    Acc v[kPerLane];
  };

  static size_t shared_bytes(int64_t widest_chunk) {
    return static_cast<size_t>(std::min<int64_t>(widest_chunk, kColumns)) * kStride * sizeof(Acc);
  }

  // slab[c][j] = x[b0 + j, column0 + c] for c < width (zero past the batch).
  __device__ static void load(Acc* slab, const Scalar* __restrict__ x, int64_t batch, int64_t k, int64_t b0,
                              int64_t column0, int width) {
    const int lane = threadIdx.x % kWarp;
    for (int j = threadIdx.x / kWarp; j < kBatch; j += kWarps) {
      const int64_t b = b0 + j;
      if (b < batch) {
        const Scalar* row = x + b * k + column0;
        for (int c = lane; c < width; c += kWarp) slab[c * kStride + j] = Traits<Scalar>::load(row[c]);
      } else {
        for (int c = lane; c < width; c += kWarp) slab[c * kStride + j] = Acc(0);
      }
    }
  }

  __device__ static Vector read(const Acc* slab, int slab_row) {
    return *reinterpret_cast<const Vector*>(slab + slab_row * kStride + (threadIdx.x % kWarp) * kPerLane);
  }
};

// The next up to 32 nonzeros of a segment that fall inside the staged chunk: lane l holds
// nonzero position + l. Columns ascend inside a segment, so those in the chunk are a prefix.
struct NonzeroBatch {
  int64_t index;  // this lane's nonzero
  int slab_row;   // its column inside the chunk (0 when not in it)
  bool in_chunk;
  int count;      // lanes in the chunk
};

__device__ NonzeroBatch next_nonzeros(const int16_t* __restrict__ cols, int64_t position, int64_t end,
                                      uint32_t chunk_lo, uint32_t chunk_hi) {
  const int64_t index = position + threadIdx.x % kWarp;
  const uint32_t local = index < end ? static_cast<uint16_t>(cols[index]) : 0xffffffffu;
  const bool in_chunk = local < chunk_hi;
  const int count = __popc(__ballot_sync(kFullMask, in_chunk));
  return {index, in_chunk ? static_cast<int>(local - chunk_lo) : 0, in_chunk, count};
}

template <class Scalar>
using SpmmStaging = Staging<Scalar, sizeof(typename Traits<Scalar>::Acc) == 8 ? 1 : 2>;

// CTA per (row group, batch tile), flattened with the row group fastest so that CTAs running
// together share batch tiles of x in L2. Loops over every chunk of every panel.
template <class Scalar>
__global__ void __launch_bounds__(kThreads, 2)
    spmm_kernel(const Scalar* __restrict__ x, const Scalar* __restrict__ values, const Scalar* __restrict__ bias,
                const PanelPlan plan, int64_t batch, int64_t row_groups, int64_t tiles, Scalar* __restrict__ out) {
  using S = SpmmStaging<Scalar>;
  using Acc = typename S::Acc;
  extern __shared__ __align__(16) unsigned char shared[];
  Acc* slab = reinterpret_cast<Acc*>(shared);
  const int lane = threadIdx.x % kWarp;
  const int64_t panels = ceil_div(plan.k, plan.panel);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t first_row = (tile % row_groups) * kRowsPerBlock + (threadIdx.x / kWarp) * kRowsPerWarp;
    const int64_t b0 = (tile / row_groups) * S::kBatch;
    const int64_t lane_row = first_row + lane;
    Acc acc[kRowsPerWarp][S::kPerLane];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int t = 0; t < S::kPerLane; ++t) acc[r][t] = Acc(0);
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t panel_lo = p * plan.panel;
      const int64_t panel_width = std::min(plan.panel, plan.k - panel_lo);
      // Lane r: the cursor into, and the end of, row first_row + r's segment of this panel.
      int64_t cursor = 0;
      int64_t end = 0;
      if (lane_row < plan.rows) {
        cursor = plan.row_ptr[p * plan.rows + lane_row];
        end = plan.row_ptr[p * plan.rows + lane_row + 1];
      }
      for (int64_t chunk_lo = 0; chunk_lo < panel_width; chunk_lo += S::kColumns) {
        const int width = static_cast<int>(std::min<int64_t>(S::kColumns, panel_width - chunk_lo));
        __syncthreads();  // every warp is done with the previous chunk
        S::load(slab, x, batch, plan.k, b0, panel_lo + chunk_lo, width);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (first_row + r >= plan.rows) break;
          int64_t position = __shfl_sync(kFullMask, static_cast<long long>(cursor), r);
          const int64_t row_end = __shfl_sync(kFullMask, static_cast<long long>(end), r);
          while (position < row_end) {
            const NonzeroBatch nz = next_nonzeros(plan.cols, position, row_end, static_cast<uint32_t>(chunk_lo),
                                                  static_cast<uint32_t>(chunk_lo + width));
            const Acc value = nz.in_chunk ? Traits<Scalar>::load(values[nz.index]) : Acc(0);
            for (int j = 0; j < nz.count; ++j) {
              const int slab_row = __shfl_sync(kFullMask, nz.slab_row, j);
              const Acc v = __shfl_sync(kFullMask, value, j);
              const typename S::Vector staged = S::read(slab, slab_row);
#pragma unroll
              for (int t = 0; t < S::kPerLane; ++t) acc[r][t] += v * staged.v[t];
            }
            position += nz.count;
            if (nz.count < kWarp) break;  // the segment or the chunk ended
          }
          if (lane == r) cursor = position;
        }
      }
    }
    // A warp's rows are consecutive, so over r it writes whole lines of each output row.
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t row = first_row + r;
      if (row >= plan.rows) break;
      const Acc shift = bias == nullptr ? Acc(0) : Traits<Scalar>::load(bias[row]);
#pragma unroll
      for (int t = 0; t < S::kPerLane; ++t) {
        const int64_t b = b0 + lane * S::kPerLane + t;
        if (b < batch) out[b * plan.rows + row] = Traits<Scalar>::store(acc[r][t] + shift);
      }
    }
  }
}

template <class Scalar>
using SddmmStaging = Staging<Scalar, sizeof(typename Traits<Scalar>::Acc) == 8 ? 2 : 4>;

template <class Acc>
__device__ Acc warp_sum(Acc value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// CTA per (row group, chunk of a panel), flattened with the row group fastest; loops over all
// batch tiles, adding each tile's dot products to out_acc in batch order.
template <class Scalar>
__global__ void __launch_bounds__(kThreads, 2)
    sddmm_kernel(const Scalar* __restrict__ grad_out_t, const Scalar* __restrict__ x, const PanelPlan plan,
                 int64_t batch, int64_t row_groups, int64_t chunks_per_panel, int64_t tiles,
                 typename Traits<Scalar>::Acc* __restrict__ out_acc) {
  using S = SddmmStaging<Scalar>;
  using Acc = typename S::Acc;
  extern __shared__ __align__(16) unsigned char shared[];
  Acc* slab = reinterpret_cast<Acc*>(shared);
  const int lane = threadIdx.x % kWarp;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t first_row = (tile % row_groups) * kRowsPerBlock + (threadIdx.x / kWarp) * kRowsPerWarp;
    const int64_t chunk = tile / row_groups;
    const int64_t p = chunk / chunks_per_panel;
    const int64_t panel_lo = p * plan.panel;
    const int64_t chunk_lo = (chunk % chunks_per_panel) * S::kColumns;
    const int64_t panel_width = std::min(plan.panel, plan.k - panel_lo);
    if (chunk_lo >= panel_width) continue;  // past the end of a narrower last panel; uniform over the CTA
    const int width = static_cast<int>(std::min<int64_t>(S::kColumns, panel_width - chunk_lo));
    // Lane r: where row first_row + r's nonzeros inside this chunk start, and its segment's end.
    const int64_t lane_row = first_row + lane;
    int64_t start = 0;
    int64_t end = 0;
    if (lane_row < plan.rows) {
      start = plan.row_ptr[p * plan.rows + lane_row];
      end = plan.row_ptr[p * plan.rows + lane_row + 1];
      int64_t high = end;
      while (start < high) {
        const int64_t mid = start + (high - start) / 2;
        if (static_cast<uint16_t>(plan.cols[mid]) < chunk_lo) {
          start = mid + 1;
        } else {
          high = mid;
        }
      }
    }
    for (int64_t b0 = 0; b0 < batch; b0 += S::kBatch) {
      __syncthreads();
      S::load(slab, x, batch, plan.k, b0, panel_lo + chunk_lo, width);
      __syncthreads();
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t row = first_row + r;
        if (row >= plan.rows) break;
        Acc grad[S::kPerLane];
#pragma unroll
        for (int t = 0; t < S::kPerLane; ++t) {
          const int64_t b = b0 + lane * S::kPerLane + t;
          grad[t] = b < batch ? Traits<Scalar>::load(grad_out_t[row * batch + b]) : Acc(0);
        }
        int64_t position = __shfl_sync(kFullMask, static_cast<long long>(start), r);
        const int64_t row_end = __shfl_sync(kFullMask, static_cast<long long>(end), r);
        while (position < row_end) {
          const NonzeroBatch nz = next_nonzeros(plan.cols, position, row_end, static_cast<uint32_t>(chunk_lo),
                                                static_cast<uint32_t>(chunk_lo + width));
          Acc mine = Acc(0);
          for (int j = 0; j < nz.count; ++j) {
            const typename S::Vector staged = S::read(slab, __shfl_sync(kFullMask, nz.slab_row, j));
            Acc partial = Acc(0);
#pragma unroll
            for (int t = 0; t < S::kPerLane; ++t) partial += grad[t] * staged.v[t];
            partial = warp_sum(partial);
            if (lane == j) mine = partial;
          }
          // The same lane owns the same nonzero on every batch tile: no races, a fixed order.
          if (nz.in_chunk) out_acc[nz.index] = b0 == 0 ? mine : out_acc[nz.index] + mine;
          position += nz.count;
          if (nz.count < kWarp) break;
        }
      }
    }
  }
}

// Kernels staging more than 48 KiB of shared memory must opt in, per kernel.
template <class Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <class Scalar>
cudaError_t spmm_typed(const void* x, const void* values, const void* bias, const PanelPlan& plan, int64_t batch,
                       void* out, cudaStream_t stream) {
  using S = SpmmStaging<Scalar>;
  if (batch == 0 || plan.rows == 0) return cudaSuccess;
  const int64_t row_groups = ceil_div(plan.rows, kRowsPerBlock);
  const int64_t tiles = row_groups * ceil_div(batch, S::kBatch);
  const size_t shared = S::shared_bytes(std::min(plan.panel, plan.k));
  cudaError_t status = allow_shared(spmm_kernel<Scalar>, shared);
  if (status != cudaSuccess) return status;
  spmm_kernel<Scalar><<<grid_for(tiles), kThreads, shared, stream>>>(
      static_cast<const Scalar*>(x), static_cast<const Scalar*>(values), static_cast<const Scalar*>(bias), plan,
      batch, row_groups, tiles, static_cast<Scalar*>(out));
  return cudaGetLastError();
}

template <class Scalar>
cudaError_t sddmm_typed(const void* grad_out_t, const void* x, const PanelPlan& plan, int64_t nnz, int64_t batch,
                        void* out_acc, cudaStream_t stream) {
  using S = SddmmStaging<Scalar>;
  using Acc = typename S::Acc;
  if (nnz == 0) return cudaSuccess;
  // A sum over no batch rows; otherwise the first batch tile writes every nonzero.
  if (batch == 0) return cudaMemsetAsync(out_acc, 0, static_cast<size_t>(nnz) * sizeof(Acc), stream);
  const int64_t panels = ceil_div(plan.k, plan.panel);
  const int64_t chunks_per_panel = ceil_div(std::min(plan.panel, plan.k), S::kColumns);
  const int64_t row_groups = ceil_div(plan.rows, kRowsPerBlock);
  const int64_t tiles = row_groups * panels * chunks_per_panel;
  const size_t shared = S::shared_bytes(std::min(plan.panel, plan.k));
  cudaError_t status = allow_shared(sddmm_kernel<Scalar>, shared);
  if (status != cudaSuccess) return status;
  sddmm_kernel<Scalar><<<grid_for(tiles), kThreads, shared, stream>>>(
      static_cast<const Scalar*>(grad_out_t), static_cast<const Scalar*>(x), plan, batch, row_groups,
      chunks_per_panel, tiles, static_cast<Acc*>(out_acc));
  return cudaGetLastError();
}

}  // namespace

size_t plan_panels_workspace_bytes(int64_t rows, int64_t k, int64_t panel) {
  const int64_t segments = ceil_div(k, panel) * rows;
  return segments == 0 ? 0 : scan_bytes(segments);
}

cudaError_t plan_panels_count(const BoolMatrix& mask, int64_t panel, int64_t* row_ptr, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream, int64_t* nnz) {
  return count_and_scan(mask, panel, row_ptr, workspace, workspace_bytes, stream, nnz);
}

cudaError_t plan_panels_fill(const BoolMatrix& mask, int64_t panel, const int64_t* row_ptr, int16_t* cols,
                             cudaStream_t stream) {
  return fill<int16_t>(mask, panel, row_ptr, cols, stream);
}

size_t plan_blocks_workspace_bytes(int64_t rows, int64_t k, int64_t block) {
  const BlockMap map(nullptr, rows, k, block);
  return map.bytes + (map.rows == 0 || map.cols == 0 ? 0 : scan_bytes(map.rows));
}

cudaError_t plan_blocks_count(const BoolMatrix& mask, int64_t block, int64_t* row_ptr, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream, int64_t* blocks) {
  const BlockMap map(workspace, mask.rows, mask.cols, block);
  if (map.cols == 0) {  // no columns: every block row is empty, and there are no segments to count
    *blocks = 0;
    return cudaMemsetAsync(row_ptr, 0, static_cast<size_t>(map.rows + 1) * sizeof(int64_t), stream);
  }
  if (map.bytes > 0 && mask.rows > 0) {
    cudaError_t status = cudaMemsetAsync(map.occupied, 0, map.bytes, stream);
    if (status != cudaSuccess) return status;
    const bool columns_fastest = mask.col_stride <= mask.row_stride;
    occupancy_kernel<<<grid_for(ceil_div(mask.rows * mask.cols, kThreads)), kThreads, 0, stream>>>(
        mask, block, map.cols, columns_fastest, map.occupied);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  // One panel as wide as all block columns: one segment per block row.
  return count_and_scan(map.matrix(mask, block), std::max<int64_t>(map.cols, 1), row_ptr,
                        static_cast<char*>(workspace) + map.bytes, workspace_bytes - map.bytes, stream, blocks);
}

cudaError_t plan_blocks_fill(const BoolMatrix& mask, int64_t block, const int64_t* row_ptr, const void* workspace,
                             int32_t* cols, cudaStream_t stream) {
  const BlockMap map(const_cast<void*>(workspace), mask.rows, mask.cols, block);
  return fill<int32_t>(map.matrix(mask, block), std::max<int64_t>(map.cols, 1), row_ptr, cols, stream);
}

cudaError_t check_panel_plan(const PanelPlan& plan, int64_t nnz, int32_t* flag, bool* invalid, cudaStream_t stream) {
  const int64_t segments = ceil_div(plan.k, plan.panel) * plan.rows;
  cudaError_t status = cudaMemsetAsync(flag, 0, sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  // At least one warp: row_ptr's ends are checked also when there are no segments.
  check_plan_kernel<<<warp_grid(std::max<int64_t>(segments, 1)), kThreads, 0, stream>>>(plan, segments, nnz, flag);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  int32_t host_flag = 0;
  status = cudaMemcpyAsync(&host_flag, flag, sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
  if (status != cudaSuccess) return status;
  if ((status = cudaStreamSynchronize(stream)) != cudaSuccess) return status;
  *invalid = host_flag != 0;
  return cudaSuccess;
}

cudaError_t pack_panels(const void* weight, int64_t row_stride, int64_t col_stride, size_t element_bytes,
                        const PanelPlan& plan, void* values, cudaStream_t stream) {
  switch (element_bytes) {
    case 2: return pack_typed<uint16_t>(weight, row_stride, col_stride, plan, values, stream);
    case 4: return pack_typed<uint32_t>(weight, row_stride, col_stride, plan, values, stream);
    case 8: return pack_typed<uint64_t>(weight, row_stride, col_stride, plan, values, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t unpack_panels(const void* values, size_t element_bytes, const PanelPlan& plan, void* dense,
                          cudaStream_t stream) {
  if (plan.rows == 0 || plan.k == 0) return cudaSuccess;
  cudaError_t status = cudaMemsetAsync(dense, 0, static_cast<size_t>(plan.rows * plan.k) * element_bytes, stream);
  if (status != cudaSuccess) return status;
  switch (element_bytes) {
    case 2: return unpack_typed<uint16_t>(values, plan, dense, stream);
    case 4: return unpack_typed<uint32_t>(values, plan, dense, stream);
    case 8: return unpack_typed<uint64_t>(values, plan, dense, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t spmm_panels(const void* x, const void* values, const void* bias, const PanelPlan& plan, int64_t batch,
                        ValueFormat format, void* out, cudaStream_t stream) {
  switch (format) {
    case ValueFormat::kFloat64: return spmm_typed<double>(x, values, bias, plan, batch, out, stream);
    case ValueFormat::kFloat32: return spmm_typed<float>(x, values, bias, plan, batch, out, stream);
    case ValueFormat::kFloat16: return spmm_typed<__half>(x, values, bias, plan, batch, out, stream);
    case ValueFormat::kBFloat16: return spmm_typed<__nv_bfloat16>(x, values, bias, plan, batch, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sddmm_panels(const void* grad_out_t, const void* x, const PanelPlan& plan, int64_t nnz, int64_t batch,
                         ValueFormat format, void* out_acc, cudaStream_t stream) {
  switch (format) {
    case ValueFormat::kFloat64: return sddmm_typed<double>(grad_out_t, x, plan, nnz, batch, out_acc, stream);
    case ValueFormat::kFloat32: return sddmm_typed<float>(grad_out_t, x, plan, nnz, batch, out_acc, stream);
    case ValueFormat::kFloat16: return sddmm_typed<__half>(grad_out_t, x, plan, nnz, batch, out_acc, stream);
    case ValueFormat::kBFloat16: return sddmm_typed<__nv_bfloat16>(grad_out_t, x, plan, nnz, batch, out_acc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dynasparse::cuda
