// CUDA registrations of the top-k ops: tensors -> the torch-free launchers in topk.cuh.
// Each call synchronizes its stream once (after the first radix pass, or after the N:M kernel)
// because NaN scores and k above the number of candidates are raised as ValueErrors.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/topk.cuh"
#include "cuda/torch_interop.h"
#include "topk.h"

namespace dynasparse {
namespace {

cuda::ScoreFormat score_format(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return cuda::ScoreFormat::kFloat64;
    case at::kHalf: return cuda::ScoreFormat::kFloat16;
    case at::kBFloat16: return cuda::ScoreFormat::kBFloat16;
    default: return cuda::ScoreFormat::kFloat32;
  }
}

at::Tensor infinite_threshold(const at::TensorOptions& options) {
  return at::full({}, std::numeric_limits<double>::infinity(), options);
}

// The shared path of both top-k ops: `scores` contiguous, one dtype and device; `candidates`
// empty or one (possibly undefined) tensor per score tensor. `name(i)` names tensor i in errors.
template <class NameOf>
std::tuple<std::vector<at::Tensor>, at::Tensor> select_top_k(const std::vector<at::Tensor>& scores,
                                                             const std::vector<at::Tensor>& candidates, int64_t k,
                                                             const at::TensorOptions& options, const char* op,
                                                             NameOf name) {
  std::vector<at::Tensor> masks;
  std::vector<const void*> score_pointers;
  std::vector<const bool*> candidate_pointers;
  std::vector<bool*> mask_pointers;
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (size_t i = 0; i < scores.size(); ++i) {
    masks.push_back(at::empty(scores[i].sizes(), options.dtype(at::kBool)));
    score_pointers.push_back(scores[i].data_ptr());
    candidate_pointers.push_back(candidates.empty() || !candidates[i].defined() ? nullptr
                                                                                  : candidates[i].data_ptr<bool>());
    mask_pointers.push_back(masks.back().data_ptr<bool>());
    numels.push_back(scores[i].numel());
    total += numels.back();
  }
  if (total == 0) {
    check_k_in_range(op, k, 0);  // only fails through candidates, whose count the checks could not know
    return {masks, infinite_threshold(options)};
  }

  const cuda::TopkInputs inputs{score_pointers.data(), candidate_pointers.data(), numels.data(),
                                static_cast<int64_t>(scores.size())};
  const cuda::ScoreFormat format = score_format(options.dtype().toScalarType());
  const cudaStream_t stream = current_stream(scores.front());
  // Bytes, in int64 words so the workspace is 8-byte aligned; from torch's caching allocator.
  const int64_t words = static_cast<int64_t>((cuda::topk_workspace_bytes(inputs, format) + 7) / 8);
  at::Tensor workspace = at::empty({words}, options.dtype(at::kLong));
  cuda::TopkFirstPass first_pass;
  check_launch(cuda::topk_first_pass(inputs, format, workspace.data_ptr(), stream, &first_pass), op);
  for (size_t i = 0; i < first_pass.nan_counts.size(); ++i) {
    TORCH_CHECK_VALUE(first_pass.nan_counts[i] == 0, nan_message(op, name(i), !candidates.empty()));
  }
  check_k_in_range(op, k, static_cast<int64_t>(first_pass.candidates));
  if (k == 0) {
    for (at::Tensor& mask : masks) mask.zero_();
    return {masks, infinite_threshold(options)};
  }
  at::Tensor threshold = at::empty({}, options);
  check_launch(cuda::topk_finish(inputs, format, k, workspace.data_ptr(), mask_pointers.data(), threshold.data_ptr(),
                                 stream),
               op);
  return {masks, threshold};
}

std::tuple<at::Tensor, at::Tensor> topk_mask_cuda(const at::Tensor& scores, int64_t k,
                                                  const std::optional<at::Tensor>& candidates) {
  check_topk_mask(scores, k, candidates);
  c10::DeviceGuard device_guard(scores.device());
  std::vector<at::Tensor> candidate_list;
  if (candidates.has_value()) candidate_list.push_back(candidates->contiguous());
  auto [masks, threshold] = select_top_k({scores.contiguous()}, candidate_list, k, scores.options(), "topk_mask",
                                         [](size_t) { return std::string("scores"); });
  return {masks.front(), threshold};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> topk_mask_global_cuda(at::TensorList scores, int64_t k) {
  check_topk_mask_global(scores, k);
  TORCH_CHECK(!scores.empty(), "dynasparse.topk_mask_global: an empty list has no device to run on");
  c10::DeviceGuard device_guard(scores[0].device());
  std::vector<at::Tensor> contiguous;
  for (const at::Tensor& tensor : scores) contiguous.push_back(tensor.contiguous());
  return select_top_k(contiguous, {}, k, scores[0].options(), "topk_mask_global",
                      [](size_t i) { return "scores[" + std::to_string(i) + "]"; });
}

at::Tensor nm_mask_cuda(const at::Tensor& scores_in, int64_t n, int64_t m) {
  check_nm_mask(scores_in, n, m);
  c10::DeviceGuard device_guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  if (scores.numel() == 0) return mask;
  at::Tensor nan_flag = at::empty({1}, scores.options().dtype(at::kInt));
  bool has_nan = false;
  check_launch(cuda::nm_mask(scores.data_ptr(), score_format(scores.scalar_type()), scores.numel(), n, m,
                             mask.data_ptr<bool>(), nan_flag.data_ptr<int32_t>(), current_stream(scores), &has_nan),
               "nm_mask");
  TORCH_CHECK_VALUE(!has_nan, nan_message("nm_mask", "scores", false));
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CUDA, m) {
  m.impl("topk_mask", &topk_mask_cuda);
  m.impl("topk_mask_global", &topk_mask_global_cuda);
  m.impl("nm_mask", &nm_mask_cuda);
}

}  // namespace dynasparse
