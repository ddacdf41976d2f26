// CUDA registrations of the panel-plan masked matmul ops and of plan_blocks: tensors -> the
// torch-free launchers in matmul.cuh. Every op synchronizes its stream once: plan_panels and
// plan_blocks to size `cols` by the number of nonzeros, the others to learn whether the
// plan they were given passed its check on the device before any kernel reads through it.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cuda/matmul.cuh"
#include "cuda/plan_check.h"
#include "cuda/torch_interop.h"
#include "matmul.h"

namespace dynasparse {
namespace {

cuda::ValueFormat value_format(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return cuda::ValueFormat::kFloat64;
    case at::kHalf: return cuda::ValueFormat::kFloat16;
    case at::kBFloat16: return cuda::ValueFormat::kBFloat16;
    default: return cuda::ValueFormat::kFloat32;
  }
}

// Masks are read through their strides (plans of m.T need no transposed copy).
cuda::BoolMatrix bool_matrix(const at::Tensor& mask) {
  return {mask.data_ptr<bool>(), mask.size(0), mask.size(1), mask.stride(0), mask.stride(1)};
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// x (..., size) as a contiguous [rows, size] matrix (also when size or the leading dims are 0).
at::Tensor as_rows(const at::Tensor& x) {
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  return x.reshape({rows, x.size(-1)}).contiguous();
}

std::tuple<at::Tensor, at::Tensor> plan_panels_cuda(const at::Tensor& mask, int64_t panel) {
  check_plan_panels(mask, panel);
  c10::DeviceGuard device_guard(mask.device());
  const int64_t n = mask.size(0);
  const int64_t k = mask.size(1);
  const cudaStream_t stream = current_stream(mask);
  at::Tensor row_ptr = at::empty({panel_count(k, panel) * n + 1}, mask.options().dtype(at::kLong));
  const size_t bytes = cuda::plan_panels_workspace_bytes(n, k, panel);
  at::Tensor scan_workspace = workspace(bytes, mask);
  int64_t nnz = 0;
  check_launch(cuda::plan_panels_count(bool_matrix(mask), panel, row_ptr.data_ptr<int64_t>(),
                                       scan_workspace.data_ptr(), bytes, stream, &nnz),
               "plan_panels");
  at::Tensor cols = at::empty({nnz}, mask.options().dtype(at::kShort));
  if (nnz > 0) {
    check_launch(cuda::plan_panels_fill(bool_matrix(mask), panel, row_ptr.data_ptr<int64_t>(),
                                        cols.data_ptr<int16_t>(), stream),
                 "plan_panels");
  }
  return {row_ptr, cols};
}

std::tuple<at::Tensor, at::Tensor> plan_blocks_cuda(const at::Tensor& mask, int64_t block) {
  check_plan_blocks(mask, block);
  c10::DeviceGuard device_guard(mask.device());
  const cudaStream_t stream = current_stream(mask);
  at::Tensor row_ptr = at::empty({ceil_div(mask.size(0), block) + 1}, mask.options().dtype(at::kLong));
  const size_t bytes = cuda::plan_blocks_workspace_bytes(mask.size(0), mask.size(1), block);
  at::Tensor map_and_scan = workspace(bytes, mask);
  int64_t blocks = 0;
  check_launch(cuda::plan_blocks_count(bool_matrix(mask), block, row_ptr.data_ptr<int64_t>(),
                                       map_and_scan.data_ptr(), bytes, stream, &blocks),
               "plan_blocks");
  at::Tensor cols = at::empty({blocks}, mask.options().dtype(at::kInt));
  if (blocks > 0) {
    check_launch(cuda::plan_blocks_fill(bool_matrix(mask), block, row_ptr.data_ptr<int64_t>(),
                                        map_and_scan.data_ptr(), cols.data_ptr<int32_t>(), stream),
                 "plan_blocks");
  }
  return {row_ptr, cols};
}

// weight may be any 2-D view (the input gradient's plan packs from w.T): read through its strides.
at::Tensor pack_panels_cuda(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& cols,
                            int64_t panel) {
  check_pack_panels(weight, row_ptr, cols, panel);
  c10::DeviceGuard device_guard(weight.device());
  check_plan_values("pack_panels", row_ptr, cols, panel, weight.size(0), weight.size(1));
  at::Tensor values = at::empty({cols.numel()}, weight.options());
  if (cols.numel() == 0) return values;
  check_launch(cuda::pack_panels(weight.data_ptr(), weight.stride(0), weight.stride(1), weight.element_size(),
                                 panel_plan(row_ptr, cols, weight.size(0), weight.size(1), panel),
                                 values.data_ptr(), current_stream(weight)),
               "pack_panels");
  return values;
}

at::Tensor unpack_panels_cuda(const at::Tensor& values_in, const at::Tensor& row_ptr, const at::Tensor& cols,
                              int64_t panel, int64_t n, int64_t k) {
  check_unpack_panels(values_in, row_ptr, cols, panel, n, k);
  c10::DeviceGuard device_guard(values_in.device());
  check_plan_values("unpack_panels", row_ptr, cols, panel, n, k);
  const at::Tensor values = values_in.contiguous();
  at::Tensor dense = at::empty({n, k}, values.options());
  check_launch(cuda::unpack_panels(values.data_ptr(), values.element_size(), panel_plan(row_ptr, cols, n, k, panel),
                                   dense.data_ptr(), current_stream(values)),
               "unpack_panels");
  return dense;
}

at::Tensor spmm_panels_cuda(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& row_ptr,
                            const at::Tensor& cols, int64_t panel, int64_t n,
                            const c10::optional<at::Tensor>& bias_in) {
  check_spmm_panels(x_in, values_in, row_ptr, cols, panel, n, bias_in);
  c10::DeviceGuard device_guard(x_in.device());
  check_plan_values("spmm_panels", row_ptr, cols, panel, n, x_in.size(-1));
  const at::Tensor x = as_rows(x_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, x.options());
  check_launch(cuda::spmm_panels(x.data_ptr(), values.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
                                 panel_plan(row_ptr, cols, n, x.size(1), panel), x.size(0),
                                 value_format(x.scalar_type()), out.data_ptr(), current_stream(x)),
               "spmm_panels");
  return out;
}

at::Tensor sddmm_panels_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& row_ptr,
                             const at::Tensor& cols, int64_t panel) {
  check_sddmm_panels(grad_out_in, x_in, row_ptr, cols, panel);
  c10::DeviceGuard device_guard(x_in.device());
  check_plan_values("sddmm_panels", row_ptr, cols, panel, grad_out_in.size(-1), x_in.size(-1));
  const at::Tensor x = as_rows(x_in);
  // [N, batch]: a warp reads one row's gradients for consecutive batch rows.
  const at::Tensor grad_out_t = as_rows(grad_out_in).t().contiguous();
  const bool accumulates_in_place = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({cols.numel()}, x.options());
  // fp16 and bf16 accumulate over the batch tiles in fp32, rounded once at the end.
  at::Tensor out_acc = accumulates_in_place ? out : at::empty({cols.numel()}, x.options().dtype(at::kFloat));
  check_launch(cuda::sddmm_panels(grad_out_t.data_ptr(), x.data_ptr(),
                                  panel_plan(row_ptr, cols, grad_out_t.size(0), x.size(1), panel), cols.numel(),
                                  x.size(0), value_format(x.scalar_type()), out_acc.data_ptr(), current_stream(x)),
               "sddmm_panels");
  if (!accumulates_in_place) out.copy_(out_acc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CUDA, m) {
  m.impl("plan_panels", &plan_panels_cuda);
  m.impl("plan_blocks", &plan_blocks_cuda);
  m.impl("pack_panels", &pack_panels_cuda);
  m.impl("unpack_panels", &unpack_panels_cuda);
  m.impl("spmm_panels", &spmm_panels_cuda);
  m.impl("sddmm_panels", &sddmm_panels_cuda);
}

}  // namespace dynasparse
