// Every dynasparse op schema, defined once. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*_bindings.cpp; fake (meta) implementations, autograd
// and the Triton variants live in python/dynasparse/ops/<family>.py, which derives the
// Triton schemas from these so that no schema is written twice. One fragment per
// family, so each can tell torch which Python module holds its fake implementations.
#include <torch/library.h>

TORCH_LIBRARY(dynasparse, m) {}

// Bitmask layout: bool mask (..., K) <-> int32 words (..., ceil(K / 32)).
// Bit j of word w in a row is element 32 * w + j of that row; tail bits are zero.
TORCH_LIBRARY_FRAGMENT(dynasparse, m) {
  m.set_python_module("dynasparse.ops.bitmask");
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor packed, SymInt k) -> Tensor");
}
