// Argument checks and shapes of the masked matmul ops (plans, packing, products), shared by
// the CPU and CUDA bindings; python/dynasparse/checks.py raises the same errors for the
// Python backends. Everything is checked, a plan's index values too (see "plan values").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

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

// --- plan values ---
//
// The checks above see shapes only, but a plan's index values decide where the kernels read
// and write, and a plan may come from anywhere (built by hand, loaded, edited). So every op
// also checks the values against the matrix it runs on, whose K is the operand's own (x's
// width, weight's, unpack's k, C * kh * kw): a plan whose columns fit that K cannot lead a
// kernel out of range, whatever K the plan was built for. The functions here walk a whole
// plan on the host and throw its first violation in index order, with the message
// checks.py gives. The CPU block ops call them directly (a block plan is small); the panel
// kernels check each segment in their own loops (cpu/panels.h) and the CUDA bindings on the
// device, and both call these only to report what they found.

// row_ptr [segments + 1] of a plan with nnz entries: from 0 to nnz, never decreasing.
inline void check_row_ptr_values(const char* op, const int64_t* row_ptr, int64_t segments, int64_t nnz) {
  TORCH_CHECK_VALUE(row_ptr[0] == 0, "dynasparse.", op, ": row_ptr[0] must be 0, got ", row_ptr[0],
                    " (row_ptr and cols as built by the plan ops)");
  TORCH_CHECK_VALUE(row_ptr[segments] == nnz, "dynasparse.", op, ": row_ptr[", segments,
                    "] must be cols.numel() = ", nnz, ", got ", row_ptr[segments],
                    " (row_ptr and cols as built by the plan ops)");
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK_VALUE(row_ptr[s] <= row_ptr[s + 1], "dynasparse.", op, ": row_ptr must not decrease, but row_ptr[",
                      s, "] = ", row_ptr[s], " > row_ptr[", s + 1, "] = ", row_ptr[s + 1]);
  }
}

// Columns of panel p of a K-column matrix: the offsets its segments may hold are [0, width).
inline int64_t panel_width(int64_t p, int64_t panel, int64_t k) { return std::min(panel, k - p * panel); }

// A panel plan of an [n, k] matrix: row_ptr as above, and inside each (panel, row) segment
// ascending column offsets (cols read as uint16) below the panel's width.
inline void check_panel_plan_values(const char* op, const int64_t* row_ptr, const int16_t* cols, int64_t nnz,
                                    int64_t panel, int64_t n, int64_t k) {
  const int64_t segments = panel_count(k, panel) * n;
  check_row_ptr_values(op, row_ptr, segments, nnz);
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t p = s / n, width = panel_width(p, panel, k);
    for (int64_t i = row_ptr[s]; i < row_ptr[s + 1]; ++i) {
      const int64_t offset = static_cast<uint16_t>(cols[i]);
      TORCH_CHECK_INDEX(offset < width, "dynasparse.", op, ": cols[", i, "] = ", offset, " is outside panel ", p,
                        " of row ", s % n, ", whose column offsets are in [0, ", width, ") (a panel plan of an [", n,
                        ", ", k, "] matrix with panel ", panel, ")");
      const int64_t previous = i == row_ptr[s] ? -1 : static_cast<uint16_t>(cols[i - 1]);
      TORCH_CHECK_VALUE(offset > previous, "dynasparse.", op, ": cols[", i, "] = ", offset, " follows cols[", i - 1,
                        "] = ", previous, " in panel ", p, " of row ", s % n,
                        ": column offsets must ascend inside a (panel, row) segment");
    }
  }
}

// A block plan of an [n, k] matrix: row_ptr as above, and inside each block row ascending
// block columns below ceil(k / block).
inline void check_block_plan_values(const char* op, const int64_t* row_ptr, const int32_t* cols, int64_t nnz,
                                    int64_t block, int64_t n, int64_t k) {
  const int64_t block_rows = ceil_div(n, block), block_cols = ceil_div(k, block);
  check_row_ptr_values(op, row_ptr, block_rows, nnz);
  for (int64_t r = 0; r < block_rows; ++r) {
    for (int64_t q = row_ptr[r]; q < row_ptr[r + 1]; ++q) {
      TORCH_CHECK_INDEX(cols[q] >= 0 && cols[q] < block_cols, "dynasparse.", op, ": cols[", q, "] = ", cols[q],
                        " is outside block row ", r, ", whose block columns are in [0, ", block_cols,
                        ") (a block plan of an [", n, ", ", k, "] matrix with block ", block, ")");
      TORCH_CHECK_VALUE(q == row_ptr[r] || cols[q] > cols[q - 1], "dynasparse.", op, ": cols[", q, "] = ", cols[q],
                        " follows cols[", q - 1, "] = ", cols[q - 1], " in block row ", r,
                        ": block columns must ascend inside a block row");
    }
  }
}

// The same for CPU tensors that passed check_panel_plan / check_block_plan.
inline void check_panel_plan_values(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols,
                                    int64_t panel, int64_t n, int64_t k) {
  check_panel_plan_values(op, row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int16_t>(), cols.numel(), panel,
                          n, k);
}

inline void check_block_plan_values(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols,
                                    int64_t block, int64_t n, int64_t k) {
  check_block_plan_values(op, row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int32_t>(), cols.numel(), block,
                          n, k);
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

// An activation-like operand (..., size) of `ref`'s dtype and device.
inline void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                          const char* ref_name) {
  check_float(op, name, t);
  TORCH_CHECK_VALUE(t.dim() >= 1, "dynasparse.", op, ": ", name, " must have at least one dimension");
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

inline void check_conv_param(const char* op, const char* name, c10::IntArrayRef param, int64_t minimum) {
  TORCH_CHECK_VALUE(param.size() == 2 && param[0] >= minimum && param[1] >= minimum, "dynasparse.", op, ": ", name,
                    " must be two integers >= ", minimum, ", got ", param);
}

// The four parameters of a 2-D convolution (after x, whose spatial size the reach check needs).
inline void check_conv_params(const char* op, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_conv_param(op, "kernel_size", kernel_size, 1);
  check_conv_param(op, "stride", stride, 1);
  check_conv_param(op, "padding", padding, 0);
  check_conv_param(op, "dilation", dilation, 1);
}

// x's padded size holds the dilated kernel in both spatial dimensions (an output of >= 1 pixel).
inline void check_conv_reach(const char* op, const at::Tensor& x, c10::IntArrayRef kernel_size,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  for (int d = 0; d < 2; ++d) {
    const int64_t padded = x.size(2 + d) + 2 * padding[d], reach = dilation[d] * (kernel_size[d] - 1) + 1;
    TORCH_CHECK_VALUE(padded >= reach, "dynasparse.", op, ": x's padded size ", padded, " in dimension ", 2 + d,
                      " is smaller than the dilated kernel's ", reach);
  }
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
  check_conv_params(op, kernel_size, stride, padding, dilation);
  check_panel_plan(op, row_ptr, cols, panel, n, x.size(1) * kernel_size[0] * kernel_size[1], x, "x");
  check_panel_values(op, values, cols);
  check_same_dtype(op, "values", values, x, "x");
  check_bias(op, bias, n, x);
  check_conv_reach(op, x, kernel_size, padding, dilation);
}

// grad_out [B, N, OH, OW] of x [B, C, H, W]'s convolution: the plan is of the [N, C * kh * kw]
// weight gradient.
inline void check_conv2d_sddmm_panels(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& row_ptr,
                                      const at::Tensor& cols, int64_t panel, c10::IntArrayRef kernel_size,
                                      c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const char* op = "conv2d_sddmm_panels";
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 4, "dynasparse.", op, ": x must be 4-D [B, C, H, W], got ", x.dim(), "-D");
  check_operand(op, "grad_out", grad_out, x, "x");
  TORCH_CHECK_VALUE(grad_out.dim() == 4, "dynasparse.", op, ": grad_out must be 4-D [B, N, OH, OW], got ",
                    grad_out.dim(), "-D");
  check_conv_params(op, kernel_size, stride, padding, dilation);
  check_conv_reach(op, x, kernel_size, padding, dilation);
  const int64_t out_h = conv_output_size(x.size(2), kernel_size[0], stride[0], padding[0], dilation[0]);
  const int64_t out_w = conv_output_size(x.size(3), kernel_size[1], stride[1], padding[1], dilation[1]);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(2) == out_h && grad_out.size(3) == out_w,
                    "dynasparse.", op, ": grad_out must be [", x.size(0), ", N, ", out_h, ", ", out_w,
                    "] (the convolution output of x ", x.sizes(), " with this geometry), got ", grad_out.sizes());
  check_panel_plan(op, row_ptr, cols, panel, grad_out.size(1), x.size(1) * kernel_size[0] * kernel_size[1], x, "x");
}

// grad_out (..., N) and x (..., K): same leading dims, same dtype and device. Their widths
// are N and K themselves; the plan (and sddmm_blocks' mask) is checked against them.
inline void check_sddmm_operands(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "dynasparse.", op, ": x must have at least one dimension");
  check_operand(op, "grad_out", grad_out, x, "x");
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

}  // namespace dynasparse
