// CUDA registrations of the fused optimizer steps: tensors -> the torch-free launchers in optim.cuh.
// Packed values are written by pack_panels (matmul.cuh) after the step, on the same stream: the
// step kernels run over flat spans, which do not know where a row's plan nonzeros start.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "cuda/matmul.cuh"
#include "cuda/optim.cuh"
#include "cuda/plan_check.h"
#include "cuda/torch_interop.h"
#include "optim.h"

namespace dynasparse {
namespace {

cuda::GradType grad_type_of(const at::Tensor& grad) {
  switch (grad.scalar_type()) {
    case at::kBFloat16: return cuda::GradType::kBFloat16;
    case at::kHalf: return cuda::GradType::kFloat16;
    default: return cuda::GradType::kFloat32;
  }
}

// Raw pointers per tensor, the contiguous copies of grads and masks they point into, and the
// scratch and output buffers of one launch sequence.
struct Launch {
  std::vector<at::Tensor> keep_alive;
  std::vector<cuda::StepTensor> tensors;
  at::Tensor partials;
  at::Tensor norms;
};

Launch prepare(at::TensorList params, at::TensorList grads, const OptionalTensorList& masks,
               const c10::List<bool>& feedback, at::TensorList statistics,
               std::initializer_list<at::TensorList> state_lists) {
  Launch launch;
  int64_t slots = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor grad = grads[i].contiguous();
    const std::optional<at::Tensor> mask = masks.get(i);
    const at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
    launch.keep_alive.push_back(grad);
    launch.keep_alive.push_back(mask_contiguous);
    cuda::StepTensor tensor{params[i].data_ptr<float>(),
                            grad.data_ptr(),
                            grad_type_of(grad),
                            mask_contiguous.defined() ? mask_contiguous.data_ptr<bool>() : nullptr,
                            feedback.get(i),
                            statistics.empty() ? nullptr : statistics[i].data_ptr<float>(),
                            {nullptr, nullptr, nullptr},
                            params[i].numel()};
    int slot = 0;
    for (const at::TensorList& list : state_lists) {
      tensor.state[slot++] = list.empty() ? nullptr : list[i].data_ptr<float>();
    }
    launch.tensors.push_back(tensor);
    slots += cuda::partial_slots(tensor.numel);
  }
  const at::TensorOptions options = params[0].options();
  launch.partials = at::empty({slots}, options.dtype(at::kDouble));
  launch.norms = at::empty({static_cast<int64_t>(params.size())}, options.dtype(at::kFloat));
  return launch;
}

// Before any param is written: a bad plan must fail the step, not leave it half done.
void check_packing_plans(const char* op, at::TensorList params, at::IntArrayRef packed_params,
                         at::TensorList packed_row_ptrs, at::TensorList packed_cols, at::IntArrayRef packed_panels) {
  for (size_t j = 0; j < packed_params.size(); ++j) {
    const auto [n, k] = packed_matrix_shape(params[packed_params[j]]);
    check_plan_values(op, packed_row_ptrs[j], packed_cols[j], packed_panels[j], n, k);
  }
}

void pack_after_step(const char* op, at::TensorList params, at::IntArrayRef packed_params,
                     at::TensorList packed_values, at::TensorList packed_row_ptrs, at::TensorList packed_cols,
                     at::IntArrayRef packed_panels, cudaStream_t stream) {
  for (size_t j = 0; j < packed_params.size(); ++j) {
    const at::Tensor& param = params[packed_params[j]];
    const auto [n, k] = packed_matrix_shape(param);
    const cuda::PanelPlan plan{packed_row_ptrs[j].const_data_ptr<int64_t>(), packed_cols[j].const_data_ptr<int16_t>(),
                               n, k, packed_panels[j]};
    check_launch(cuda::pack_panels(param.const_data_ptr(), k, 1, sizeof(float), plan, packed_values[j].data_ptr(),
                                   stream),
                 op);
  }
}

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const OptionalTensorList& masks, const c10::List<bool>& feedback,
                         at::TensorList statistics, double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool first_step,
                         c10::string_view statistic, std::optional<double> statistic_ema,
                         at::IntArrayRef packed_params, at::TensorList packed_values, at::TensorList packed_row_ptrs,
                         at::TensorList packed_cols, at::IntArrayRef packed_panels) {
  const StatisticRule rule = check_step_inputs("sgd_step", params, grads, masks, feedback, statistics,
                                               std::string_view(statistic.data(), statistic.size()), statistic_ema);
  const SgdScalars scalars =
      check_sgd(params, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
  check_step_packing("sgd_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                     packed_panels);
  c10::DeviceGuard device_guard(params[0].device());
  check_packing_plans("sgd_step", params, packed_params, packed_row_ptrs, packed_cols, packed_panels);
  const cudaStream_t stream = current_stream(params[0]);
  Launch launch = prepare(params, grads, masks, feedback, statistics, {momentum_buffers});
  check_launch(cuda::sgd_step(launch.tensors.data(), static_cast<int64_t>(launch.tensors.size()), scalars, rule,
                              launch.partials.data_ptr<double>(), launch.norms.data_ptr<float>(), stream),
               "sgd_step");
  pack_after_step("sgd_step", params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels,
                  stream);
  return launch.norms;
}

at::Tensor adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           const OptionalTensorList& masks, const c10::List<bool>& feedback,
                           at::TensorList statistics, double lr, double beta1, double beta2, double eps,
                           double weight_decay, int64_t step, bool amsgrad, bool maximize,
                           c10::string_view statistic, std::optional<double> statistic_ema,
                           at::IntArrayRef packed_params, at::TensorList packed_values,
                           at::TensorList packed_row_ptrs, at::TensorList packed_cols, at::IntArrayRef packed_panels) {
  const StatisticRule rule = check_step_inputs("adamw_step", params, grads, masks, feedback, statistics,
                                               std::string_view(statistic.data(), statistic.size()), statistic_ema);
  const AdamwScalars scalars = check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                                           weight_decay, step, amsgrad, maximize);
  check_step_packing("adamw_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                     packed_panels);
  c10::DeviceGuard device_guard(params[0].device());
  check_packing_plans("adamw_step", params, packed_params, packed_row_ptrs, packed_cols, packed_panels);
  const cudaStream_t stream = current_stream(params[0]);
  Launch launch = prepare(params, grads, masks, feedback, statistics, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  check_launch(cuda::adamw_step(launch.tensors.data(), static_cast<int64_t>(launch.tensors.size()), scalars, rule,
                                launch.partials.data_ptr<double>(), launch.norms.data_ptr<float>(), stream),
               "adamw_step");
  pack_after_step("adamw_step", params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels,
                  stream);
  return launch.norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("adamw_step", &adamw_step_cuda);
}

}  // namespace dynasparse
