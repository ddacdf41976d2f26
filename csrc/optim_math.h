// One weight's optimizer step, shared by the CPU kernels (g++) and the CUDA kernels (nvcc),
// so both follow torch.optim's order of operations in the same code. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DYNASPARSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DYNASPARSE_HOST_DEVICE inline
#endif

namespace dynasparse {

enum class Statistic : int { kNone = 0, kAbs = 1, kSquare = 2 };

// s = keep * s + add * f(grad): a running sum is keep = add = 1 (exact), an EMA keep = ema.
struct StatisticRule {
  Statistic kind;
  float keep;
  float add;
};

// SGD hyperparameters as the kernels use them; grad_sign is -1 under maximize.
struct SgdScalars {
  float lr, momentum, dampening_keep, weight_decay, grad_sign;
  bool nesterov, first_step;
};

// AdamW hyperparameters; decay_factor = 1 - lr * weight_decay, step_size = lr / (1 - beta1^t),
// both computed in double on the host like torch.optim does.
struct AdamwScalars {
  float lr, one_minus_beta1, beta2, one_minus_beta2, eps, decay_factor, step_size, bias_correction2_sqrt,
      grad_sign;
  bool amsgrad;
};

// All ones where `flag`, else zero: the lane mask keep_where takes.
DYNASPARSE_HOST_DEVICE uint32_t lane_mask(bool flag) { return 0u - static_cast<uint32_t>(flag); }

// `value` where `lanes` is all ones, exactly +0.0f where it is zero. A bitwise select, which
// compilers vectorize; a ternary on a bool loaded from a byte mask stays a (mispredicted) branch.
DYNASPARSE_HOST_DEVICE float keep_where(uint32_t lanes, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= lanes;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// `if_set` where `lanes` is all ones, else `if_clear`. Every choice inside the loops goes
// through these, including loop-invariant ones: a ternary there makes the compiler unswitch
// the loop into versions of which it vectorizes only some.
DYNASPARSE_HOST_DEVICE float select(uint32_t lanes, float if_set, float if_clear) {
  uint32_t set_bits, clear_bits;
  std::memcpy(&set_bits, &if_set, sizeof(set_bits));
  std::memcpy(&clear_bits, &if_clear, sizeof(clear_bits));
  const uint32_t bits = (set_bits & lanes) | (clear_bits & ~lanes);
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

DYNASPARSE_HOST_DEVICE float statistic_update(float statistic, float grad, const StatisticRule& rule) {
  const float value = select(lane_mask(rule.kind == Statistic::kAbs), std::fabs(grad), grad * grad);
  return rule.keep * statistic + rule.add * value;
}

// `active` zero (a lane_mask) is a pruned weight in masked mode: it and its state become exactly zero.
template <bool kMomentum>
DYNASPARSE_HOST_DEVICE void sgd_update(float& weight, float& buffer, float grad, uint32_t active, const SgdScalars& s) {
  float direction = s.grad_sign * grad + s.weight_decay * weight;
  float new_buffer = 0.0f;
  if (kMomentum) {
    new_buffer = select(lane_mask(s.first_step), direction, s.momentum * buffer + s.dampening_keep * direction);
    direction = select(lane_mask(s.nesterov), direction + s.momentum * new_buffer, new_buffer);
    buffer = keep_where(active, new_buffer);
  }
  weight = keep_where(active, weight - s.lr * direction);
}

template <bool kAmsgrad>
DYNASPARSE_HOST_DEVICE void adamw_update(float& weight, float& exp_avg, float& exp_avg_sq, float& max_exp_avg_sq,
                                         float grad, uint32_t active, const AdamwScalars& s) {
  const float g = s.grad_sign * grad;
  // torch's lerp: exact at both ends whichever side the weight is on.
  const float m = select(lane_mask(s.one_minus_beta1 < 0.5f), exp_avg + s.one_minus_beta1 * (g - exp_avg),
                         g - (g - exp_avg) * (1.0f - s.one_minus_beta1));
  const float v = s.beta2 * exp_avg_sq + s.one_minus_beta2 * g * g;
  float second_moment = v;
  if (kAmsgrad) {
    second_moment = max_exp_avg_sq > v ? max_exp_avg_sq : v;
    max_exp_avg_sq = keep_where(active, second_moment);
  }
  const float denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  const float updated = weight * s.decay_factor - s.step_size * (m / denom);
  exp_avg = keep_where(active, m);
  exp_avg_sq = keep_where(active, v);
  weight = keep_where(active, updated);
}

}  // namespace dynasparse
