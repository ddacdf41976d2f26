// The device-side check of a panel plan's values, shared by the bindings of every op that reads
// through a plan (the masked matmuls, and the optimizer steps that repack values).
#pragma once

#include <ATen/ATen.h>

#include "cuda/matmul.cuh"
#include "cuda/torch_interop.h"
#include "matmul.h"

namespace dynasparse {

inline cuda::PanelPlan panel_plan(const at::Tensor& row_ptr, const at::Tensor& cols, int64_t rows, int64_t k,
                                  int64_t panel) {
  return {row_ptr.data_ptr<int64_t>(), cols.data_ptr<int16_t>(), rows, k, panel};
}

// The plan's values, checked on the device (one stream synchronization); a bad plan is copied
// to the host to throw its first violation with the message of every other backend.
inline void check_plan_values(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols, int64_t panel,
                              int64_t rows, int64_t k) {
  at::Tensor flag = at::empty({1}, row_ptr.options().dtype(at::kInt));
  bool invalid = false;
  check_launch(cuda::check_panel_plan(panel_plan(row_ptr, cols, rows, k, panel), cols.numel(),
                                      flag.data_ptr<int32_t>(), &invalid, current_stream(row_ptr)),
               op);
  if (!invalid) return;
  check_panel_plan_values(op, row_ptr.cpu(), cols.cpu(), panel, rows, k);
  TORCH_INTERNAL_ASSERT(false, "dynasparse.", op, ": the plan failed its device check but passed the host one");
}

}  // namespace dynasparse
