// Fused optimizer step kernels (see optim.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "optim.cuh"

namespace dynasparse::cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill an H100 several times over; larger tensors loop (grid stride).
constexpr int64_t kMaxBlocks = 1024;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

// Fixed-shape tree over the block: the same order on every run. Thread 0 gets the total.
__device__ double block_sum(double value) {
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

template <typename GradT, bool kMomentum>
__global__ void sgd_step_kernel(StepTensor t, SgdScalars s, StatisticRule rule, double* __restrict__ partials) {
  const GradT* __restrict__ grad = static_cast<const GradT*>(t.grad);
  double error = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < t.numel; i += stride) {
    const float g = to_float(grad[i]);
    if (t.statistic != nullptr) t.statistic[i] = statistic_update(t.statistic[i], g, rule);
    const bool kept = t.mask == nullptr || t.mask[i];
    float w = t.weight[i];
    float b = kMomentum ? t.state[0][i] : 0.0f;
    sgd_update<kMomentum>(w, b, g, lane_mask(kept || t.feedback), s);
    t.weight[i] = w;
    if (kMomentum) t.state[0][i] = b;
    if (!kept) error += static_cast<double>(w) * w;
  }
  const double total = block_sum(error);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename GradT, bool kAmsgrad>
__global__ void adamw_step_kernel(StepTensor t, AdamwScalars s, StatisticRule rule, double* __restrict__ partials) {
  const GradT* __restrict__ grad = static_cast<const GradT*>(t.grad);
  double error = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < t.numel; i += stride) {
    const float g = to_float(grad[i]);
    if (t.statistic != nullptr) t.statistic[i] = statistic_update(t.statistic[i], g, rule);
    const bool kept = t.mask == nullptr || t.mask[i];
    float w = t.weight[i], m = t.state[0][i], v = t.state[1][i];
    float v_max = kAmsgrad ? t.state[2][i] : 0.0f;
    adamw_update<kAmsgrad>(w, m, v, v_max, g, lane_mask(kept || t.feedback), s);
    t.weight[i] = w;
    t.state[0][i] = m;
    t.state[1][i] = v;
    if (kAmsgrad) t.state[2][i] = v_max;
    if (!kept) error += static_cast<double>(w) * w;
  }
  const double total = block_sum(error);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void finish_norm_kernel(const double* __restrict__ partials, int64_t slots, float* __restrict__ norm) {
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < slots; i += blockDim.x) sum += partials[i];
  const double total = block_sum(sum);
  if (threadIdx.x == 0) *norm = static_cast<float>(sqrt(total));
}

template <template <typename> class Launch, typename Scalars>
cudaError_t launch_all(const StepTensor* tensors, int64_t count, const Scalars& scalars, bool flag,
                       const StatisticRule& rule, double* partials, float* norms, cudaStream_t stream) {
  for (int64_t i = 0; i < count; ++i) {
    const StepTensor& t = tensors[i];
    const int64_t slots = partial_slots(t.numel);
    if (slots > 0) {
      switch (t.grad_type) {
        case GradType::kBFloat16: Launch<__nv_bfloat16>::run(t, scalars, flag, rule, partials, slots, stream); break;
        case GradType::kFloat16: Launch<__half>::run(t, scalars, flag, rule, partials, slots, stream); break;
        default: Launch<float>::run(t, scalars, flag, rule, partials, slots, stream); break;
      }
    }
    // An empty tensor still gets its norm (0) written: one slot-free reduction.
    finish_norm_kernel<<<1, kThreads, 0, stream>>>(partials, slots, norms + i);
    partials += slots;
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

// `flag` picks the state the kernel touches: momentum for SGD, amsgrad for AdamW.
template <typename GradT>
struct SgdLaunch {
  static void run(const StepTensor& t, const SgdScalars& s, bool momentum, const StatisticRule& rule,
                  double* partials, int64_t slots, cudaStream_t stream) {
    if (momentum) {
      sgd_step_kernel<GradT, true><<<slots, kThreads, 0, stream>>>(t, s, rule, partials);
    } else {
      sgd_step_kernel<GradT, false><<<slots, kThreads, 0, stream>>>(t, s, rule, partials);
    }
  }
};

template <typename GradT>
struct AdamwLaunch {
  static void run(const StepTensor& t, const AdamwScalars& s, bool amsgrad, const StatisticRule& rule,
                  double* partials, int64_t slots, cudaStream_t stream) {
    if (amsgrad) {
      adamw_step_kernel<GradT, true><<<slots, kThreads, 0, stream>>>(t, s, rule, partials);
    } else {
      adamw_step_kernel<GradT, false><<<slots, kThreads, 0, stream>>>(t, s, rule, partials);
    }
  }
};

}  // namespace

int64_t partial_slots(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

cudaError_t sgd_step(const StepTensor* tensors, int64_t count, const SgdScalars& scalars, const StatisticRule& rule,
                     double* partials, float* norms, cudaStream_t stream) {
  const bool momentum = count > 0 && tensors[0].state[0] != nullptr;
  return launch_all<SgdLaunch>(tensors, count, scalars, momentum, rule, partials, norms, stream);
}

cudaError_t adamw_step(const StepTensor* tensors, int64_t count, const AdamwScalars& scalars,
                       const StatisticRule& rule, double* partials, float* norms, cudaStream_t stream) {
  return launch_all<AdamwLaunch>(tensors, count, scalars, scalars.amsgrad, rule, partials, norms, stream);
}

}  // namespace dynasparse::cuda
