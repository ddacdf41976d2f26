// Half-precision operands of the fp32 AVX-512 kernels (panel and block products): widened to fp32
// (exact), multiplied and accumulated in fp32 as torch's own bf16 / fp16 products are, and the
// result rounded once. One vectorized conversion pass per operand, against a scalar generic
// kernel an order of magnitude slower.
#pragma once

#include <ATen/ATen.h>

namespace dynasparse {

inline bool runs_in_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

inline at::Tensor as_float(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.to(at::kFloat) : tensor;
}

}  // namespace dynasparse
