// Argument checks and scalar set-up of the fused optimizer steps, shared by the CPU and CUDA
// bindings so both reject bad input with the same messages as python/dynasparse/checks.py.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "matmul.h"
#include "optim_math.h"

namespace dynasparse {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

inline void check_same_layout(const char* op, const char* list, size_t i, const at::Tensor& tensor,
                              const at::Tensor& param) {
  TORCH_CHECK_VALUE(tensor.device() == param.device(), "dynasparse.", op, ": ", list, "[", i, "] is on ",
                    tensor.device(), " but params[", i, "] is on ", param.device());
  TORCH_CHECK_VALUE(tensor.sizes() == param.sizes(), "dynasparse.", op, ": ", list, "[", i, "] has shape ",
                    tensor.sizes(), " but params[", i, "] has shape ", param.sizes());
}

// Tensors the step writes in place: fp32 and contiguous, so kernels index them flat.
inline void check_state(const char* op, const char* list, size_t i, const at::Tensor& tensor,
                        const at::Tensor& param) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == at::kFloat, "dynasparse.", op, ": ", list, "[", i,
                   "] must be torch.float32, got ", tensor.scalar_type());
  check_same_layout(op, list, i, tensor, param);
  TORCH_CHECK_VALUE(tensor.is_contiguous(), "dynasparse.", op, ": ", list, "[", i,
                    "] must be contiguous (it is updated in place)");
}

inline void check_state_list(const char* op, const char* list, at::TensorList tensors, at::TensorList params,
                             bool used, const char* used_when) {
  const size_t expected = used ? params.size() : 0;
  TORCH_CHECK_VALUE(tensors.size() == expected, "dynasparse.", op, ": ", list, " must hold ", expected,
                    " tensors (one per param", used_when, "), got ", tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) check_state(op, list, i, tensors[i], params[i]);
}

inline StatisticRule check_step_inputs(const char* op, at::TensorList params, at::TensorList grads,
                                       const OptionalTensorList& masks, const c10::List<bool>& feedback,
                                       at::TensorList statistics, std::string_view statistic,
                                       std::optional<double> statistic_ema) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && masks.size() == n && feedback.size() == n, "dynasparse.", op,
                    ": params, grads, masks and feedback must have the same length, got ", n, ", ",
                    grads.size(), ", ", masks.size(), " and ", feedback.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat, "dynasparse.", op, ": params[", i,
                     "] must be torch.float32, got ", param.scalar_type());
    TORCH_CHECK_VALUE(param.is_contiguous(), "dynasparse.", op, ": params[", i,
                      "] must be contiguous (it is updated in place)");
    TORCH_CHECK_VALUE(param.device() == params[0].device(), "dynasparse.", op,
                      ": all params must be on one device, got ", params[0].device(), " and ", param.device());
    const auto grad_type = grads[i].scalar_type();
    TORCH_CHECK_TYPE(grad_type == at::kFloat || grad_type == at::kBFloat16 || grad_type == at::kHalf,
                     "dynasparse.", op, ": grads[", i, "] must be torch.float32, bfloat16 or float16, got ",
                     grad_type);
    check_same_layout(op, "grads", i, grads[i], param);
    const std::optional<at::Tensor> mask = masks.get(i);
    if (mask.has_value()) {
      TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "dynasparse.", op, ": masks[", i,
                       "] must be torch.bool, got ", mask->scalar_type(),
                       " (masks are explicit bool tensors; never derive one from weight == 0)");
      check_same_layout(op, "masks", i, *mask, param);
    }
  }
  StatisticRule rule{Statistic::kNone, 1.0f, 1.0f};
  if (statistic == "abs") {
    rule.kind = Statistic::kAbs;
  } else if (statistic == "square") {
    rule.kind = Statistic::kSquare;
  } else {
    TORCH_CHECK_VALUE(statistic == "none", "dynasparse.", op,
                      ": statistic must be 'none', 'abs' or 'square', got '", std::string(statistic), "'");
  }
  check_state_list(op, "statistics", statistics, params, rule.kind != Statistic::kNone,
                   " when statistic is set, else none");
  if (statistic_ema.has_value()) {
    const double ema = *statistic_ema;
    TORCH_CHECK_VALUE(ema >= 0.0 && ema < 1.0, "dynasparse.", op, ": statistic_ema must be in [0, 1), got ", ema);
    rule.keep = static_cast<float>(ema);
    rule.add = static_cast<float>(1.0 - ema);
  }
  return rule;
}

// A param with packed values, seen as the [N, K] matrix its panel plan describes.
inline std::pair<int64_t, int64_t> packed_matrix_shape(const at::Tensor& param) {
  const int64_t n = param.size(0);
  int64_t k = 1;
  for (int64_t d = 1; d < param.dim(); ++d) k *= param.size(d);
  return {n, k};
}

inline void check_step_packing(const char* op, at::TensorList params, const OptionalTensorList& masks,
                               at::IntArrayRef packed_params, at::TensorList packed_values,
                               at::TensorList packed_row_ptrs, at::TensorList packed_cols,
                               at::IntArrayRef packed_panels) {
  const size_t count = packed_params.size();
  TORCH_CHECK_VALUE(packed_values.size() == count && packed_row_ptrs.size() == count &&
                        packed_cols.size() == count && packed_panels.size() == count,
                    "dynasparse.", op, ": packed_params, packed_values, packed_row_ptrs, packed_cols and "
                    "packed_panels must have the same length, got ", count, ", ", packed_values.size(), ", ",
                    packed_row_ptrs.size(), ", ", packed_cols.size(), " and ", packed_panels.size());
  std::vector<bool> listed(params.size(), false);
  for (size_t j = 0; j < count; ++j) {
    const int64_t i = packed_params[j];
    TORCH_CHECK_VALUE(i >= 0 && i < static_cast<int64_t>(params.size()), "dynasparse.", op, ": packed_params[", j,
                      "] = ", i, " is not the index of a param (there are ", params.size(), ")");
    TORCH_CHECK_VALUE(!listed[i], "dynasparse.", op, ": params[", i, "] is listed twice in packed_params");
    listed[i] = true;
    TORCH_CHECK_VALUE(masks.get(i).has_value(), "dynasparse.", op, ": params[", i,
                      "] has packed values but no mask (they are packed by the plan of its mask)");
    const at::Tensor& param = params[i];
    TORCH_CHECK_VALUE(param.dim() >= 1, "dynasparse.", op, ": params[", i,
                      "] is 0-d; packed values need a param seen as [size(0), numel / size(0)]");
    const auto [n, k] = packed_matrix_shape(param);
    check_panel_plan(op, packed_row_ptrs[j], packed_cols[j], packed_panels[j], n, k, param, "the param");
    TORCH_CHECK_TYPE(packed_values[j].scalar_type() == at::kFloat, "dynasparse.", op, ": packed_values[", j,
                     "] must be torch.float32 (the param's dtype), got ", packed_values[j].scalar_type());
    check_panel_values(op, packed_values[j], packed_cols[j]);
    TORCH_CHECK_VALUE(packed_values[j].is_contiguous(), "dynasparse.", op, ": packed_values[", j,
                      "] must be contiguous (it is written in place)");
  }
}

inline SgdScalars check_sgd(at::TensorList params, at::TensorList momentum_buffers, double lr, double momentum,
                            double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  TORCH_CHECK_VALUE(lr >= 0.0, "dynasparse.sgd_step: lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(momentum >= 0.0, "dynasparse.sgd_step: momentum must be >= 0, got ", momentum);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "dynasparse.sgd_step: weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "dynasparse.sgd_step: nesterov needs momentum > 0 and dampening == 0");
  check_state_list("sgd_step", "momentum_buffers", momentum_buffers, params, momentum != 0.0,
                   " when momentum != 0, else none");
  return {static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
          static_cast<float>(weight_decay), maximize ? -1.0f : 1.0f, nesterov, first_step};
}

inline AdamwScalars check_adamw(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                at::TensorList max_exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                                double weight_decay, int64_t step, bool amsgrad, bool maximize) {
  TORCH_CHECK_VALUE(lr >= 0.0, "dynasparse.adamw_step: lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
                    "dynasparse.adamw_step: betas must be in [0, 1), got (", beta1, ", ", beta2, ")");
  TORCH_CHECK_VALUE(eps >= 0.0, "dynasparse.adamw_step: eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "dynasparse.adamw_step: weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(step >= 1, "dynasparse.adamw_step: step (the count including this one) must be >= 1, got ",
                    step);
  check_state_list("adamw_step", "exp_avgs", exp_avgs, params, true, "");
  check_state_list("adamw_step", "exp_avg_sqs", exp_avg_sqs, params, true, "");
  check_state_list("adamw_step", "max_exp_avg_sqs", max_exp_avg_sqs, params, amsgrad, " when amsgrad, else none");
  // Bias corrections in double on the host, as torch.optim computes them.
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<float>(lr), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(lr / bias_correction1), static_cast<float>(std::sqrt(bias_correction2)),
          maximize ? -1.0f : 1.0f, amsgrad};
}

}  // namespace dynasparse
