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

// Fused optimizer steps over every tensor of a parameter group (python/dynasparse/optim).
// fp32 params and state, fp32/bf16/fp16 grads. Per tensor, masks[i] (bool, shaped like the
// param) or None (dense) and feedback[i]: with a mask, feedback=True updates every weight
// (DPF: the gradient taken at m * w trains the dense w), feedback=False (masked) updates the
// active weights only and sets pruned weights and their state to exactly zero. State lists
// are empty when unused (momentum == 0, amsgrad == False); statistics is empty or one fp32
// buffer per param accumulating f(grad) = |grad| ("abs") or grad^2 ("square") at every
// position, as a running sum (statistic_ema=None) or s = ema * s + (1 - ema) * f. Returns
// the fp32 norms ||w - m * w|| after the step, one per param (0 for dense params).
//
// Packed values for the masked matmul: for each j, params[packed_params[j]] (which has a
// mask), seen as [N, K] = [size(0), numel / size(0)], gets its updated values at the nonzeros
// of the panel plan (packed_row_ptrs[j], packed_cols[j], packed_panels[j]) of its mask written
// to packed_values[j] (fp32, in plan order: what pack_panels returns), so the next forward
// needs no packing pass over w. The CPU kernel does it in the step's pass over each row;
// the CUDA and Triton backends launch pack_panels after the step.
TORCH_LIBRARY_FRAGMENT(dynasparse, m) {
  m.set_python_module("dynasparse.ops.optim");
  m.def("sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, "
        "bool[] feedback, Tensor(c!)[] statistics, float lr, float momentum, float dampening, "
        "float weight_decay, bool nesterov, bool maximize, bool first_step, str statistic, "
        "float? statistic_ema, int[] packed_params, Tensor(p!)[] packed_values, Tensor[] packed_row_ptrs, "
        "Tensor[] packed_cols, int[] packed_panels) -> Tensor");
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] masks, bool[] feedback, Tensor(e!)[] statistics, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, bool amsgrad, "
        "bool maximize, str statistic, float? statistic_ema, int[] packed_params, Tensor(p!)[] packed_values, "
        "Tensor[] packed_row_ptrs, Tensor[] packed_cols, int[] packed_panels) -> Tensor");
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
  // RigL's drop and grow of one layer: among the active weights (mask) the active - k of
  // largest |weight| stay, among the inactive ones the k of largest |grad| grow, ties to the
  // lower flat index. Returns the new mask, the flat indices of the dropped and of the grown
  // weights (int64, k each, ascending) and how many inactive weights are nonzero (0-d int64).
  m.def("rigl_masks(Tensor weight, Tensor mask, Tensor grad, SymInt k) -> (Tensor new_mask, Tensor dropped, "
        "Tensor grown, Tensor pruned_nonzeros)");
}

// Masked matmul over a weight w [N, K] and a bool mask m [N, K]: y = x @ (w * m).T (+ bias),
// grad_input = grad_out @ (w * m) (the same products over the plan of m.T, with w.T's
// values), and the masked weight gradient (SDDMM: grad_out.T @ x at the mask's nonzeros).
// Kernels read a plan built once per mask change, never the bool mask itself.
//
// Panel plan (unstructured masks): K is cut into panels of `panel` columns (1..65536). Entry
// p * N + n of row_ptr (int64, ceil(K / panel) * N + 1 entries) is where row n's nonzeros
// inside panel p start; cols (int16) holds each nonzero's column minus p * panel as the low
// 16 bits of an unsigned value, ascending inside a (panel, row) segment. Packed values (one
// per nonzero, in plan order) are refreshed from w whenever w changes.
//
// Block plan (b x b blocks): row_ptr (int64, ceil(N / b) + 1 entries) starts each block row's
// run of cols (int32 block-column indices, ascending); a block is listed when any of its mask
// elements is set. Packed values are [blocks, b, b] holding w * m, zero past N and K.
//
// Fused bitmask path (Triton): w is read directly and masked in registers by its packed
// bitmask (pack_mask of m); a block plan of m with b = tile lists the tiles to visit.
TORCH_LIBRARY_FRAGMENT(dynasparse, m) {
  m.set_python_module("dynasparse.ops.matmul");
  m.def("plan_panels(Tensor mask, int panel) -> (Tensor row_ptr, Tensor cols)");
  m.def("plan_blocks(Tensor mask, int block) -> (Tensor row_ptr, Tensor cols)");
  m.def("pack_panels(Tensor weight, Tensor row_ptr, Tensor cols, int panel) -> Tensor");
  m.def("pack_blocks(Tensor weight, Tensor mask, Tensor row_ptr, Tensor cols, int block) -> Tensor");
  m.def("unpack_panels(Tensor values, Tensor row_ptr, Tensor cols, int panel, SymInt n, SymInt k) -> Tensor");
  m.def("unpack_blocks(Tensor values, Tensor row_ptr, Tensor cols, SymInt n, SymInt k) -> Tensor");
  // y (..., n) = x (..., K) @ W.T (+ bias), W the [n, K] matrix a plan and its values describe.
  m.def("spmm_panels(Tensor x, Tensor values, Tensor row_ptr, Tensor cols, int panel, SymInt n, "
        "Tensor? bias=None) -> Tensor");
  m.def("spmm_blocks(Tensor x, Tensor values, Tensor row_ptr, Tensor cols, SymInt n, Tensor? bias=None) -> Tensor");
  // Packed values (plan order) of grad_out (..., N).T @ x (..., K), summed over all leading dims.
  m.def("sddmm_panels(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor cols, int panel) -> Tensor");
  m.def("sddmm_blocks(Tensor grad_out, Tensor x, Tensor mask, Tensor row_ptr, Tensor cols, int block) -> Tensor");
  // y [B, n, OH, OW] = conv2d(x [B, C, H, W], W viewed as [n, C, kh, kw]) (+ bias): the panel
  // plan's K index is c * kh * kw + dy * kw + dx (a conv weight reshaped to 2-D). Zero padding.
  m.def("conv2d_panels(Tensor x, Tensor values, Tensor row_ptr, Tensor cols, int panel, SymInt n, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, Tensor? bias=None) -> Tensor");
  // Packed values (plan order) of that convolution's weight gradient, [n, C * kh * kw] at the
  // plan's nonzeros, from grad_out [B, n, OH, OW] and x: summed over images and output pixels.
  m.def("conv2d_sddmm_panels(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor cols, int panel, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def("masked_mm(Tensor x, Tensor weight, Tensor mask_words, Tensor tile_ptr, Tensor tile_cols, int tile, "
        "Tensor? bias=None) -> Tensor");
  // Dense [N, K] weight gradient, zero wherever the mask is.
  m.def("masked_sddmm(Tensor grad_out, Tensor x, Tensor mask_words, Tensor tile_ptr, Tensor tile_cols, "
        "int tile) -> Tensor");
}
