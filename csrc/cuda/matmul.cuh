// Masked matmul kernels over panel plans (layouts in csrc/ops.cpp): plan building for panel
// and block plans, packing/unpacking values, the SpMM y = x @ W.T (+ bias) and the SDDMM
// grad_out.T @ x at the plan's nonzeros. Plain CUDA over raw pointers and a stream, no torch
// headers, so this compiles against any torch build.
//
// Plans: a count pass (one warp per segment, ballots over 32 columns at a time) writes each
// segment's nonzero count into row_ptr[1 + s], CUB's in-place inclusive scan turns them into
// offsets, and a fill pass writes ascending column offsets in the same ballot order, so plans
// are deterministic and identical to the reference's. Host synchronization: exactly one per
// plan, in `*_count`, which copies the total to the host to size `cols`. Block plans first
// mark occupied blocks in a [ceil(N/b), ceil(K/b)] byte map (skipped for b = 1) and then plan
// that map as a one-panel plan with int32 columns.
//
// Products: a CTA owns 256 output rows (32 per warp, one per lane for its cursor) and a tile
// of batch rows, and stages x[batch tile, column chunk] in shared memory as [column][batch]
// (converted to the accumulator type) so a warp reads one staged column per nonzero without
// bank conflicts. Chunks never cross a panel, so every row has one segment per chunk and walks
// it with a cursor. The SpMM keeps its [rows x batch tile] accumulators in registers across
// all chunks; the SDDMM gives each CTA one (rows, chunk) pair, loops over all batch tiles and
// reduces each nonzero's dot product across the warp, accumulating in a buffer of the
// accumulator type in a fixed order (deterministic, no atomics). Any panel width works; a
// chunk is at most 372 columns (SpMM) or 186 (SDDMM) and never crosses a panel, so one wide
// panel (panel = min(K, 65536)) is what the kernels want: narrower panels only add segments
// and, below the chunk width, more chunks (each a block-wide barrier and staging pass). fp32 accumulation for fp32/fp16/bf16,
// fp64 for fp64. All launchers are asynchronous unless stated; 0-sized work launches nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dynasparse::cuda {

enum class ValueFormat { kFloat64, kFloat32, kFloat16, kBFloat16 };

// A bool matrix, element (r, c) at data[r * row_stride + c * col_stride] (any strides).
struct BoolMatrix {
  const bool* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
};

// A panel plan of an [rows, k] matrix: row_ptr has ceil(k / panel) * rows + 1 entries.
struct PanelPlan {
  const int64_t* row_ptr;
  const int16_t* cols;
  int64_t rows;
  int64_t k;
  int64_t panel;
};

// Device workspace (bytes) of plan_panels_count for an [rows, k] mask.
size_t plan_panels_workspace_bytes(int64_t rows, int64_t k, int64_t panel);
// Writes row_ptr and returns the number of nonzeros in *nnz; synchronizes `stream` once
// (not at all when the plan has no segments).
cudaError_t plan_panels_count(const BoolMatrix& mask, int64_t panel, int64_t* row_ptr, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream, int64_t* nnz);
// Writes the *nnz column offsets of the plan whose row_ptr plan_panels_count wrote.
cudaError_t plan_panels_fill(const BoolMatrix& mask, int64_t panel, const int64_t* row_ptr, int16_t* cols,
                             cudaStream_t stream);

// The same for block plans; the workspace (holding the occupancy map) must stay untouched
// between plan_blocks_count and plan_blocks_fill.
size_t plan_blocks_workspace_bytes(int64_t rows, int64_t k, int64_t block);
cudaError_t plan_blocks_count(const BoolMatrix& mask, int64_t block, int64_t* row_ptr, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream, int64_t* blocks);
cudaError_t plan_blocks_fill(const BoolMatrix& mask, int64_t block, const int64_t* row_ptr, const void* workspace,
                             int32_t* cols, cudaStream_t stream);

// Whether the plan's index values are what check_panel_plan_values (csrc/matmul.h) accepts:
// row_ptr from 0 to nnz, never decreasing, and inside each segment ascending column offsets
// below its panel's width. A warp per segment sets `flag` (4 bytes of device memory) on any
// violation; *invalid receives it, so this synchronizes `stream` once. Every kernel below
// relies on it (they read row_ptr and cols unchecked).
cudaError_t check_panel_plan(const PanelPlan& plan, int64_t nnz, int32_t* flag, bool* invalid, cudaStream_t stream);

// values[i] = weight[row, column] of plan nonzero i; weight is [plan.rows, plan.k] with any
// strides (counted in elements of `element_bytes` = 2, 4 or 8 bytes).
cudaError_t pack_panels(const void* weight, int64_t row_stride, int64_t col_stride, size_t element_bytes,
                        const PanelPlan& plan, void* values, cudaStream_t stream);
// Dense contiguous [plan.rows, plan.k]: zero, then the values at the plan's nonzeros.
cudaError_t unpack_panels(const void* values, size_t element_bytes, const PanelPlan& plan, void* dense,
                          cudaStream_t stream);

// out [batch, plan.rows] = x [batch, plan.k] @ W.T (+ bias [plan.rows], may be nullptr), all
// contiguous and of `format`.
cudaError_t spmm_panels(const void* x, const void* values, const void* bias, const PanelPlan& plan, int64_t batch,
                        ValueFormat format, void* out, cudaStream_t stream);
// out_acc[i] = sum over b of grad_out_t[row, b] * x[b, column] for each of the plan's nnz
// nonzeros (zero when batch == 0), with
// grad_out_t [plan.rows, batch] (grad_out transposed) and x [batch, plan.k] contiguous of
// `format`; out_acc is of the accumulator type (double for kFloat64, float otherwise).
cudaError_t sddmm_panels(const void* grad_out_t, const void* x, const PanelPlan& plan, int64_t nnz, int64_t batch,
                         ValueFormat format, void* out_acc, cudaStream_t stream);

}  // namespace dynasparse::cuda
