// Argument checks and shapes of the masked matmul ops (plans, packing, products), shared by
// the CPU and CUDA bindings; python/dynasparse/checks.py raises the same errors for the
// Python backends. A plan's index tensors are trusted to be what the plan ops built (reading
// them to validate would cost a pass and, on a GPU, a sync); everything else is checked.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "bitmask.h"

namespace dynasparse {

// cols are 16-bit offsets inside a panel.
constexpr int64_t kMaxPanel = 65536;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t panel_count(int64_t k, int64_t panel) { return ceil_div(k, panel); }

inline bool is_matmul_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_plan_mask(const char* op, const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "dynasparse.", op, ": mask must be torch.bool, got ",
                   mask.scalar_type(), " (masks are explicit bool tensors; never derive one from weight == 0)");
  TORCH_CHECK_VALUE(mask.dim() == 2, "dynasparse.", op, ": mask must be 2-D [N, K], got ", mask.dim(), "-D");
}

inline void check_panel(const char* op, int64_t panel) {
  TORCH_CHECK_VALUE(panel >= 1 && panel <= kMaxPanel, "dynasparse.", op, ": panel must be in [1, ", kMaxPanel,
                    "] (columns are 16-bit offsets inside a panel), got ", panel);
}

inline void check_block(const char* op, int64_t block) {
  TORCH_CHECK_VALUE(block >= 1, "dynasparse.", op, ": block must be >= 1, got ", block);
}

inline void check_size(const char* op, const char* name, int64_t size) {
  TORCH_CHECK_VALUE(size >= 0, "dynasparse.", op, ": ", name, " must be >= 0, got ", size);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "dynasparse.", op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                        const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "dynasparse.", op, ": ", name, " must be ", dtype,
                   " (as built by the plan ops), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), "dynasparse.", op, ": ", name,
                    " must be a contiguous 1-D tensor (as built by the plan ops)");
  check_same_device(op, name, t, ref, ref_name);
}

// row_ptr/cols of a panel plan for an [n, k] matrix; `ref` is the tensor they must sit beside.
inline void check_panel_plan(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols, int64_t panel,
                             int64_t n, int64_t k, const at::Tensor& ref, const char* ref_name) {
  check_panel(op, panel);
  check_index(op, "row_ptr", row_ptr, at::kLong, ref, ref_name);
  check_index(op, "cols", cols, at::kShort, ref, ref_name);
  const int64_t expected = panel_count(k, panel) * n + 1;
  TORCH_CHECK_VALUE(row_ptr.numel() == expected, "dynasparse.", op, ": row_ptr has ", row_ptr.numel(),
                    " entries, but a panel plan of an [", n, ", ", k, "] mask with panel ", panel, " has ", expected,
                    " (a plan built for another shape or panel width)");
}

inline void check_block_plan(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols, int64_t block,
                             int64_t n, const at::Tensor& ref, const char* ref_name) {
  check_block(op, block);
  check_index(op, "row_ptr", row_ptr, at::kLong, ref, ref_name);
  check_index(op, "cols", cols, at::kInt, ref, ref_name);
  const int64_t expected = ceil_div(n, block) + 1;
  TORCH_CHECK_VALUE(row_ptr.numel() == expected, "dynasparse.", op, ": row_ptr has ", row_ptr.numel(),
                    " entries, but a block plan with block ", block, " over ", n, " rows has ", expected,
                    " (a plan built for another shape or block size)");
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_matmul_float(t.scalar_type()), "dynasparse.", op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_weight(const char* op, const at::Tensor& weight) {
  check_float(op, "weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2, "dynasparse.", op, ": weight must be 2-D [N, K], got ", weight.dim(), "-D");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "dynasparse.", op, ": ", name, " is ", t.scalar_type(),
                   " but ", ref_name, " is ", ref.scalar_type(), " (one dtype per product)");
}

// An activation-like operand (..., size) of the given dtype, beside `ref`.
inline void check_operand(const char* op, const char* name, const at::Tensor& t, int64_t size,
                          const at::Tensor& ref, const char* ref_name) {
  check_float(op, name, t);
  TORCH_CHECK_VALUE(t.dim() >= 1, "dynasparse.", op, ": ", name, " must have at least one dimension");
  TORCH_CHECK_VALUE(t.size(-1) == size, "dynasparse.", op, ": ", name, " must have ", size,
                    " elements in its last dimension, got ", t.size(-1));
  check_same_dtype(op, name, t, ref, ref_name);
  check_same_device(op, name, t, ref, ref_name);
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t n, const at::Tensor& ref) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "dynasparse.", op, ": bias must have shape [", n,
                    "], got ", bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == ref.scalar_type(), "dynasparse.", op, ": bias is ", bias->scalar_type(),
                   " but x is ", ref.scalar_type());
  check_same_device(op, "bias", *bias, ref, "x");
}

inline void check_panel_values(const char* op, const at::Tensor& values, const at::Tensor& cols) {
  check_float(op, "values", values);
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == cols.numel(), "dynasparse.", op,
                    ": values must be 1-D with one entry per plan nonzero (", cols.numel(), "), got shape ",
                    values.sizes());
  check_same_device(op, "values", values, cols, "cols");
}

inline int64_t check_block_values(const char* op, const at::Tensor& values, const at::Tensor& cols) {
  check_float(op, "values", values);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == cols.numel() && values.size(1) == values.size(2) &&
                        values.size(1) >= 1,
                    "dynasparse.", op, ": values must be [", cols.numel(), ", b, b] (one b x b block per plan "
                    "block), got shape ", values.sizes());
  check_same_device(op, "values", values, cols, "cols");
  return values.size(1);
}

// --- per-op checks ---

inline void check_plan_panels(const at::Tensor& mask, int64_t panel) {
  check_plan_mask("plan_panels", mask);
  check_panel("plan_panels", panel);
}

inline void check_plan_blocks(const at::Tensor& mask, int64_t block) {
  check_plan_mask("plan_blocks", mask);
  check_block("plan_blocks", block);
}

inline void check_pack_panels(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& cols,
                              int64_t panel) {
  check_weight("pack_panels", weight);
  check_panel_plan("pack_panels", row_ptr, cols, panel, weight.size(0), weight.size(1), weight, "weight");
}

inline void check_pack_blocks(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& row_ptr,
                              const at::Tensor& cols, int64_t block) {
  check_weight("pack_blocks", weight);
  check_plan_mask("pack_blocks", mask);
  TORCH_CHECK_VALUE(mask.sizes() == weight.sizes(), "dynasparse.pack_blocks: mask has shape ", mask.sizes(),
                    " but weight has shape ", weight.sizes());
  check_same_device("pack_blocks", "mask", mask, weight, "weight");
  check_block_plan("pack_blocks", row_ptr, cols, block, weight.size(0), weight, "weight");
}

inline void check_unpack_panels(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& cols,
                                int64_t panel, int64_t n, int64_t k) {
  check_size("unpack_panels", "n", n);
  check_size("unpack_panels", "k", k);
  check_panel_plan("unpack_panels", row_ptr, cols, panel, n, k, values, "values");
  check_panel_values("unpack_panels", values, cols);
}

inline int64_t check_unpack_blocks(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& cols,
                                   int64_t n, int64_t k) {
  check_size("unpack_blocks", "n", n);
  check_size("unpack_blocks", "k", k);
  const int64_t block = check_block_values("unpack_blocks", values, cols);
  check_block_plan("unpack_blocks", row_ptr, cols, block, n, values, "values");
  return block;
}

inline void check_spmm_panels(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& cols, int64_t panel, int64_t n,
                              const c10::optional<at::Tensor>& bias) {
  check_size("spmm_panels", "n", n);
  check_float("spmm_panels", "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "dynasparse.spmm_panels: x must have at least one dimension");
  check_panel_plan("spmm_panels", row_ptr, cols, panel, n, x.size(-1), x, "x");
  check_panel_values("spmm_panels", values, cols);
  check_same_dtype("spmm_panels", "values", values, x, "x");
  check_bias("spmm_panels", bias, n, x);
}

inline int64_t check_spmm_blocks(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                 const at::Tensor& cols, int64_t n, const c10::optional<at::Tensor>& bias) {
  check_size("spmm_blocks", "n", n);
  check_float("spmm_blocks", "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "dynasparse.spmm_blocks: x must have at least one dimension");
  const int64_t block = check_block_values("spmm_blocks", values, cols);
  check_block_plan("spmm_blocks", row_ptr, cols, block, n, x, "x");
  check_same_dtype("spmm_blocks", "values", values, x, "x");
  check_bias("spmm_blocks", bias, n, x);
  return block;
}

// One spatial dimension of a convolution: (input + 2 * padding - dilation * (kernel - 1) - 1)
// / stride + 1 outputs; check_conv2d_panels ensures the numerator is >= 0.
inline int64_t conv_output_size(int64_t input, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (input + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

inline void check_conv_param(const char* name, c10::IntArrayRef param, int64_t minimum) {
  TORCH_CHECK_VALUE(param.size() == 2 && param[0] >= minimum && param[1] >= minimum,
                    "dynasparse.conv2d_panels: ", name, " must be two integers >= ", minimum, ", got ", param);
}

// x [B, C, H, W] convolved with the [n, C * kh * kw] matrix of a panel plan.
inline void check_conv2d_panels(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& cols, int64_t panel, int64_t n, c10::IntArrayRef kernel_size,
                                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                const c10::optional<at::Tensor>& bias) {
  const char* op = "conv2d_panels";
  check_size(op, "n", n);
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 4, "dynasparse.conv2d_panels: x must be 4-D [B, C, H, W], got ", x.dim(), "-D");
  check_conv_param("kernel_size", kernel_size, 1);
  check_conv_param("stride", stride, 1);
  check_conv_param("padding", padding, 0);
  check_conv_param("dilation", dilation, 1);
  check_panel_plan(op, row_ptr, cols, panel, n, x.size(1) * kernel_size[0] * kernel_size[1], x, "x");
  check_panel_values(op, values, cols);
  check_same_dtype(op, "values", values, x, "x");
  check_bias(op, bias, n, x);
  for (int d = 0; d < 2; ++d) {
    const int64_t padded = x.size(2 + d) + 2 * padding[d], reach = dilation[d] * (kernel_size[d] - 1) + 1;
    TORCH_CHECK_VALUE(padded >= reach, "dynasparse.conv2d_panels: x's padded size ", padded, " in dimension ", 2 + d,
                      " is smaller than the dilated kernel's ", reach);
  }
}

// grad_out (..., N) and x (..., K): same leading dims, same dtype and device.
inline void check_sddmm_operands(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "dynasparse.", op, ": x must have at least one dimension");
  check_operand(op, "grad_out", grad_out, grad_out.dim() >= 1 ? grad_out.size(-1) : 0, x, "x");
  TORCH_CHECK_VALUE(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "dynasparse.", op, ": grad_out ", grad_out.sizes(), " and x ", x.sizes(),
                    " must have the same leading dimensions");
}

inline void check_sddmm_panels(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                               const at::Tensor& cols, int64_t panel) {
  check_sddmm_operands("sddmm_panels", grad_out, x);
  check_panel_plan("sddmm_panels", row_ptr, cols, panel, grad_out.size(-1), x.size(-1), x, "x");
}

inline void check_sddmm_blocks(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask,
                               const at::Tensor& row_ptr, const at::Tensor& cols, int64_t block) {
  check_sddmm_operands("sddmm_blocks", grad_out, x);
  check_plan_mask("sddmm_blocks", mask);
  TORCH_CHECK_VALUE(mask.size(0) == grad_out.size(-1) && mask.size(1) == x.size(-1),
                    "dynasparse.sddmm_blocks: mask must be [", grad_out.size(-1), ", ", x.size(-1), "], got ",
                    mask.sizes());
  check_same_device("sddmm_blocks", "mask", mask, x, "x");
  check_block_plan("sddmm_blocks", row_ptr, cols, block, grad_out.size(-1), x, "x");
}

// mask_words [N, ceil(K / 32)] int32 (pack_mask of the [N, K] mask) beside `ref`.
inline void check_mask_words(const char* op, const at::Tensor& mask_words, int64_t n, int64_t k,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(mask_words.scalar_type() == at::kInt, "dynasparse.", op,
                   ": mask_words must be torch.int32 (pack_mask of the mask), got ", mask_words.scalar_type());
  TORCH_CHECK_VALUE(mask_words.dim() == 2 && mask_words.size(0) == n && mask_words.size(1) == words_per_row(k),
                    "dynasparse.", op, ": mask_words must be [", n, ", ", words_per_row(k),
                    "] (pack_mask of an [", n, ", ", k, "] mask), got ", mask_words.sizes());
  check_same_device(op, "mask_words", mask_words, ref, ref_name);
}

inline void check_masked_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_words,
                            const at::Tensor& tile_ptr, const at::Tensor& tile_cols, int64_t tile,
                            const c10::optional<at::Tensor>& bias) {
  check_weight("masked_mm", weight);
  check_operand("masked_mm", "x", x, weight.size(1), weight, "weight");
  check_mask_words("masked_mm", mask_words, weight.size(0), weight.size(1), weight, "weight");
  check_block_plan("masked_mm", tile_ptr, tile_cols, tile, weight.size(0), weight, "weight");
  check_bias("masked_mm", bias, weight.size(0), x);
}

inline void check_masked_sddmm(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask_words,
                               const at::Tensor& tile_ptr, const at::Tensor& tile_cols, int64_t tile) {
  check_sddmm_operands("masked_sddmm", grad_out, x);
  check_mask_words("masked_sddmm", mask_words, grad_out.size(-1), x.size(-1), x, "x");
  check_block_plan("masked_sddmm", tile_ptr, tile_cols, tile, grad_out.size(-1), x, "x");
}

}  // namespace dynasparse
