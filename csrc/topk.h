// Argument checks of the top-k family, shared by the CPU and CUDA bindings so both
// backends reject bad input with the same message (python/dynasparse/checks.py mirrors
// them for the fake, Triton and reference paths). Checks that need the data (NaN among
// the candidates, k against the number of candidates when a candidates mask is given)
// run inside the kernels, with the messages built here.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>

namespace dynasparse {

inline bool is_score_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
}

inline void check_score_dtype(const char* op, const std::string& name, const at::Tensor& scores) {
  TORCH_CHECK_TYPE(is_score_dtype(scores.scalar_type()), "dynasparse.", op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", scores.scalar_type());
}

inline std::string nan_message(const char* op, const std::string& name, bool among_candidates) {
  return std::string("dynasparse.") + op + ": " + name + " contains NaN" +
         (among_candidates ? " among the candidates" : "") + " (NaN has no rank)";
}

inline void check_k_in_range(const char* op, int64_t k, int64_t candidates) {
  TORCH_CHECK_VALUE(k >= 0, "dynasparse.", op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(k <= candidates, "dynasparse.", op, ": k (", k, ") exceeds the number of candidates (",
                    candidates, ")");
}

inline void check_topk_mask(const at::Tensor& scores, int64_t k, const std::optional<at::Tensor>& candidates) {
  check_score_dtype("topk_mask", "scores", scores);
  if (candidates.has_value()) {
    TORCH_CHECK_TYPE(candidates->scalar_type() == at::kBool,
                     "dynasparse.topk_mask: candidates must be torch.bool, got ", candidates->scalar_type());
    TORCH_CHECK_VALUE(candidates->sizes() == scores.sizes(),
                      "dynasparse.topk_mask: candidates must have scores' shape ", scores.sizes(), ", got ",
                      candidates->sizes());
    TORCH_CHECK_VALUE(candidates->device() == scores.device(),
                      "dynasparse.topk_mask: candidates must be on scores' device (", scores.device(), "), got ",
                      candidates->device());
    // How many candidates there are is known only to the kernel, which checks k against it.
    TORCH_CHECK_VALUE(k >= 0, "dynasparse.topk_mask: k must be >= 0, got ", k);
  } else {
    check_k_in_range("topk_mask", k, scores.numel());
  }
}

inline void check_topk_mask_global(at::TensorList scores, int64_t k) {
  int64_t total = 0;
  for (size_t i = 0; i < scores.size(); ++i) {
    const std::string name = "scores[" + std::to_string(i) + "]";
    check_score_dtype("topk_mask_global", name, scores[i]);
    TORCH_CHECK_TYPE(scores[i].scalar_type() == scores[0].scalar_type(),
                     "dynasparse.topk_mask_global: all scores must have one dtype, but scores[0] is ",
                     scores[0].scalar_type(), " and ", name, " is ", scores[i].scalar_type());
    TORCH_CHECK_VALUE(scores[i].device() == scores[0].device(),
                      "dynasparse.topk_mask_global: all scores must be on one device, but scores[0] is on ",
                      scores[0].device(), " and ", name, " on ", scores[i].device());
    total += scores[i].numel();
  }
  check_k_in_range("topk_mask_global", k, total);
}

inline void check_rigl_masks(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& grad, int64_t k) {
  check_score_dtype("rigl_masks", "weight", weight);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "dynasparse.rigl_masks: mask must be torch.bool, got ",
                   mask.scalar_type());
  TORCH_CHECK_TYPE(grad.scalar_type() == weight.scalar_type(), "dynasparse.rigl_masks: grad must have weight's dtype (",
                   weight.scalar_type(), "), got ", grad.scalar_type());
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor*>{"mask", &mask}, {"grad", &grad}}) {
    TORCH_CHECK_VALUE(tensor->sizes() == weight.sizes(), "dynasparse.rigl_masks: ", name, " must have weight's shape ",
                      weight.sizes(), ", got ", tensor->sizes());
    TORCH_CHECK_VALUE(tensor->device() == weight.device(), "dynasparse.rigl_masks: ", name,
                      " must be on weight's device (", weight.device(), "), got ", tensor->device());
  }
  // How many weights are active is known only to the kernel, which checks k against it.
  TORCH_CHECK_VALUE(k >= 0, "dynasparse.rigl_masks: k must be >= 0, got ", k);
}

inline void check_rigl_k(int64_t k, int64_t active, int64_t inactive) {
  TORCH_CHECK_VALUE(k <= active && k <= inactive, "dynasparse.rigl_masks: k (", k,
                    ") exceeds the number of active (", active, ") or inactive (", inactive, ") weights");
}

inline void check_nm_mask(const at::Tensor& scores, int64_t n, int64_t m) {
  check_score_dtype("nm_mask", "scores", scores);
  TORCH_CHECK_VALUE(scores.dim() >= 1, "dynasparse.nm_mask: scores must have at least one dimension "
                    "(groups run along the last one), got a 0-d tensor");
  TORCH_CHECK_VALUE(m >= 1, "dynasparse.nm_mask: m must be >= 1, got ", m);
  TORCH_CHECK_VALUE(n >= 0 && n <= m, "dynasparse.nm_mask: n must be in [0, m] = [0, ", m, "], got ", n);
  TORCH_CHECK_VALUE(scores.size(-1) % m == 0, "dynasparse.nm_mask: the last dimension (", scores.size(-1),
                    ") must be a multiple of m (", m, ")");
}

}  // namespace dynasparse
