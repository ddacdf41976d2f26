// What every csrc/cuda/<family>_bindings.cpp needs to hand tensors to the torch-free
// launchers: the caller's current stream and launch-error reporting. Device-generic c10
// APIs only, since torch's CUDA headers do not compile against a CPU-only torch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

namespace dynasparse {

// The caller's current stream on the tensor's device: kernels never use the default stream.
inline cudaStream_t current_stream(const at::Tensor& tensor) {
  c10::impl::VirtualGuardImpl guard_impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(guard_impl.getStream(tensor.device()).native_handle());
}

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "dynasparse.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

}  // namespace dynasparse
