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

// Top-k selection: exact k, O(n) radix select (no sort), deterministic: among equal scores
// the lower flat index is kept (tensor order first across a list); -0.0 equals 0.0; NaN
// among the candidates is an error. The threshold is the smallest kept score, a 0-d tensor
// of the scores' dtype (+inf when k == 0).
TORCH_LIBRARY_FRAGMENT(dynasparse, m) {
  m.set_python_module("dynasparse.ops.topk");
  // The k largest scores among `candidates` (a bool mask of scores' shape; all when None).
  m.def("topk_mask(Tensor scores, SymInt k, Tensor? candidates=None) -> (Tensor mask, Tensor threshold)");
  // The k largest scores over a whole list of tensors (any shapes, one dtype and device),
  // without concatenating them.
  m.def("topk_mask_global(Tensor[] scores, SymInt k) -> (Tensor[] masks, Tensor threshold)");
  // N:M: the n largest scores in every group of m consecutive elements of the last dimension.
  m.def("nm_mask(Tensor scores, int n, int m) -> Tensor");
}
