// CUDA registrations of the fused optimizer steps: tensors -> the torch-free launchers in optim.cuh.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "cuda/optim.cuh"
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

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const OptionalTensorList& masks, const c10::List<bool>& feedback,
                         at::TensorList statistics, double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool first_step,
                         c10::string_view statistic, std::optional<double> statistic_ema) {
  const StatisticRule rule = check_step_inputs("sgd_step", params, grads, masks, feedback, statistics,
                                               std::string_view(statistic.data(), statistic.size()), statistic_ema);
  const SgdScalars scalars =
      check_sgd(params, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
  c10::DeviceGuard device_guard(params[0].device());
  Launch launch = prepare(params, grads, masks, feedback, statistics, {momentum_buffers});
  check_launch(cuda::sgd_step(launch.tensors.data(), static_cast<int64_t>(launch.tensors.size()), scalars, rule,
                              launch.partials.data_ptr<double>(), launch.norms.data_ptr<float>(),
                              current_stream(params[0])),
               "sgd_step");
  return launch.norms;
}

at::Tensor adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           const OptionalTensorList& masks, const c10::List<bool>& feedback,
                           at::TensorList statistics, double lr, double beta1, double beta2, double eps,
                           double weight_decay, int64_t step, bool amsgrad, bool maximize,
                           c10::string_view statistic, std::optional<double> statistic_ema) {
  const StatisticRule rule = check_step_inputs("adamw_step", params, grads, masks, feedback, statistics,
                                               std::string_view(statistic.data(), statistic.size()), statistic_ema);
  const AdamwScalars scalars = check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                                           weight_decay, step, amsgrad, maximize);
  c10::DeviceGuard device_guard(params[0].device());
  Launch launch = prepare(params, grads, masks, feedback, statistics, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  check_launch(cuda::adamw_step(launch.tensors.data(), static_cast<int64_t>(launch.tensors.size()), scalars, rule,
                                launch.partials.data_ptr<double>(), launch.norms.data_ptr<float>(),
                                current_stream(params[0])),
               "adamw_step");
  return launch.norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("adamw_step", &adamw_step_cuda);
}

}  // namespace dynasparse
