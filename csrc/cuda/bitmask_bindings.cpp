// CUDA registrations of the bitmask ops: tensors -> the torch-free launchers in bitmask.cuh.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "bitmask.h"
#include "cuda/bitmask.cuh"
#include "cuda/torch_interop.h"

namespace dynasparse {
namespace {

at::Tensor pack_mask_cuda(const at::Tensor& mask_in) {
  check_pack_mask(mask_in);
  c10::DeviceGuard device_guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor packed = at::empty(packed_sizes(mask), mask.options().dtype(at::kInt));
  const int64_t k = mask.size(-1);
  const int64_t rows = k == 0 ? 0 : mask.numel() / k;
  check_launch(cuda::pack_mask(mask.data_ptr<bool>(), reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()),
                               rows, k, current_stream(mask)),
               "pack_mask");
  return packed;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed_in, int64_t k) {
  check_unpack_mask(packed_in, k);
  c10::DeviceGuard device_guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor mask = at::empty(unpacked_sizes(packed, k), packed.options().dtype(at::kBool));
  const int64_t rows = k == 0 ? 0 : mask.numel() / k;
  check_launch(cuda::unpack_mask(reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()),
                                 mask.data_ptr<bool>(), rows, k, current_stream(packed)),
               "unpack_mask");
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CUDA, m) {
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
}

}  // namespace dynasparse
