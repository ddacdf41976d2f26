// Fused optimizer step kernels (sgd_step, adamw_step; contract in csrc/ops.cpp). Plain CUDA
// over raw pointers and a stream, no torch headers, so this compiles against any torch build.
//
// One launch per tensor (grad dtypes may differ between tensors), each a grid-stride
// elementwise pass doing the whole step (csrc/optim_math.h, shared with the CPU kernels).
// Every block writes its share of ||w - m * w||^2, summed in double by a fixed tree, to its
// slot of `partials`; a second one-block launch per tensor adds the tensor's slots in a fixed
// order. No float atomics: the norms are the same on every run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "optim_math.h"

namespace dynasparse::cuda {

enum class GradType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tensor of a step; null for absent state, mask or statistic.
struct StepTensor {
  float* weight;
  const void* grad;
  GradType grad_type;
  const bool* mask;
  bool feedback;
  float* statistic;
  float* state[3];  // SGD: momentum buffer. AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq.
  int64_t numel;
};

// How many double slots of `partials` a tensor of `numel` elements uses (its grid size).
int64_t partial_slots(int64_t numel);

// Launch the step for `count` tensors (host array) on `stream`. `partials` holds the sum of
// partial_slots(numel) doubles over the tensors; `norms` receives `count` floats.
cudaError_t sgd_step(const StepTensor* tensors, int64_t count, const SgdScalars& scalars, const StatisticRule& rule,
                     double* partials, float* norms, cudaStream_t stream);
cudaError_t adamw_step(const StepTensor* tensors, int64_t count, const AdamwScalars& scalars,
                       const StatisticRule& rule, double* partials, float* norms, cudaStream_t stream);

}  // namespace dynasparse::cuda
