// CPU kernels of the fused optimizer steps (sgd_step, adamw_step; see csrc/ops.cpp).
//
// Every tensor of the call is cut into fixed spans of kSpanElements; one parallel region runs
// over the spans of all tensors (multi-tensor apply), each span doing the whole step in one
// pass over weight, grad, state, mask and statistic (loops the compiler vectorizes). Each
// span returns its share of ||w - m * w||^2 in double, and the shares are added per tensor
// in span order, so the norms do not depend on the thread count. Tensors whose packed values
// are asked for are cut at row boundaries instead, and a span gathers the values at its rows'
// plan nonzeros right after updating them, from cache rather than a second pass over memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "optim.h"
#include "panels.h"
#include "parallel.h"

namespace dynasparse {
namespace {

// Large enough to amortize the per-span dispatch, small enough to balance 2 to 64 threads.
constexpr int64_t kSpanElements = 1 << 14;
// A step over at most this many spans (64 Ki weights) runs on the calling thread: waking a
// helper cost about 20 us, as much as the whole step of a 16 Ki-weight layer (a 128 x 128
// Linear's step took 46 us on 2 threads, 24 us on 1).
constexpr int64_t kInlineSpans = 4;
// The error is summed in fp32 over blocks this long (vector lanes, a fixed order), the
// blocks in double: a double accumulator in the vector loop would halve its width.
constexpr int64_t kErrorBlock = 256;

struct Span {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

// What one tensor's kernel reads and writes; null pointers for absent masks and state.
struct TensorPointers {
  float* weight;
  const void* grad;
  at::ScalarType grad_type;
  const bool* mask;
  bool feedback;
  float* statistic;
  float* state[3];
  // Packed values (null when not asked for) and the panel plan, of the param as [rows, row_length].
  float* packed;
  const int64_t* row_ptr;
  const int16_t* cols;
  int64_t rows;
  int64_t row_length;
  int64_t panel;
};

template <typename Fn>
auto with_flag(bool flag, Fn&& fn) {
  return flag ? fn(std::true_type{}) : fn(std::false_type{});
}

template <typename Fn>
auto with_grad_type(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: return fn(float{});
  }
}

// Contiguous copies of the read-only inputs, kept alive for the call, and the raw pointers.
struct Prepared {
  std::vector<at::Tensor> keep_alive;
  std::vector<TensorPointers> tensors;
};

struct Packing {
  at::IntArrayRef params;
  at::TensorList values;
  at::TensorList row_ptrs;
  at::TensorList cols;
  at::IntArrayRef panels;
};

Prepared prepare(at::TensorList params, at::TensorList grads, const OptionalTensorList& masks,
                 const c10::List<bool>& feedback, at::TensorList statistics,
                 std::initializer_list<at::TensorList> state_lists, const Packing& packing) {
  Prepared prepared;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor grad = grads[i].contiguous();
    const std::optional<at::Tensor> mask = masks.get(i);
    const at::Tensor mask_contiguous = mask.has_value() ? mask->contiguous() : at::Tensor();
    prepared.keep_alive.push_back(grad);
    prepared.keep_alive.push_back(mask_contiguous);
    TensorPointers pointers{params[i].data_ptr<float>(),
                            grad.data_ptr(),
                            grad.scalar_type(),
                            mask_contiguous.defined() ? mask_contiguous.data_ptr<bool>() : nullptr,
                            feedback.get(i),
                            statistics.empty() ? nullptr : statistics[i].data_ptr<float>(),
                            {nullptr, nullptr, nullptr},
                            nullptr,
                            nullptr,
                            nullptr,
                            0,
                            0,
                            0};
    int slot = 0;
    for (const at::TensorList& list : state_lists) {
      pointers.state[slot++] = list.empty() ? nullptr : list[i].data_ptr<float>();
    }
    prepared.tensors.push_back(pointers);
  }
  for (size_t j = 0; j < packing.params.size(); ++j) {
    TensorPointers& pointers = prepared.tensors[packing.params[j]];
    std::tie(pointers.rows, pointers.row_length) = packed_matrix_shape(params[packing.params[j]]);
    pointers.packed = packing.values[j].data_ptr<float>();
    pointers.row_ptr = packing.row_ptrs[j].const_data_ptr<int64_t>();
    pointers.cols = packing.cols[j].const_data_ptr<int16_t>();
    pointers.panel = packing.panels[j];
  }
  return prepared;
}

// The packing plans' values, before any param is written: a bad plan fails the step instead of
// leaving it half done, and pack_rows can read and write through the plans unchecked.
void check_packing_plans(const char* op, at::TensorList params, const Packing& packing) {
  for (size_t j = 0; j < packing.params.size(); ++j) {
    const auto [rows, row_length] = packed_matrix_shape(params[packing.params[j]]);
    PanelPlanCheck check(op, packing.row_ptrs[j], packing.cols[j], packing.panels[j], rows, row_length);
    if (!check.rows_ok(0, rows)) check.fail();
    check.finish();
  }
}

// packed[q] = the updated weight at plan nonzero q, for the nonzeros of rows [row_begin, row_end).
void pack_rows(const TensorPointers& t, int64_t row_begin, int64_t row_end) {
  const int64_t panels = panel_count(t.row_length, t.panel);
  for (int64_t row = row_begin; row < row_end; ++row) {
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel_start = t.weight + row * t.row_length + p * t.panel;
      const int64_t segment = p * t.rows + row;
      for (int64_t q = t.row_ptr[segment]; q < t.row_ptr[segment + 1]; ++q) {
        t.packed[q] = panel_start[static_cast<uint16_t>(t.cols[q])];
      }
    }
  }
}

// Runs span_error(tensor pointers, begin, end) -> double over every span in one parallel
// region; returns the per-tensor sqrt of the summed shares as fp32.
template <typename SpanFn>
at::Tensor run_spans(at::TensorList params, const std::vector<TensorPointers>& tensors, SpanFn span_error) {
  std::vector<Span> spans;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    const int64_t row_length = std::max<int64_t>(tensors[i].row_length, 1);
    const int64_t length =
        tensors[i].packed ? std::max<int64_t>(1, kSpanElements / row_length) * row_length : kSpanElements;
    for (int64_t begin = 0; begin < numel; begin += length) {
      spans.push_back({i, begin, std::min(numel, begin + length)});
    }
  }
  std::vector<double> shares(spans.size());
  parallel_for(0, static_cast<int64_t>(spans.size()), kInlineSpans, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const Span& span = spans[index];
      const TensorPointers& t = tensors[span.tensor];
      shares[index] = span_error(t, span.begin, span.end);
      if (t.packed) pack_rows(t, span.begin / t.row_length, span.end / t.row_length);
    }
  });
  std::vector<double> sums(params.size(), 0.0);
  for (size_t index = 0; index < spans.size(); ++index) sums[spans[index].tensor] += shares[index];
  at::Tensor norms = at::empty({static_cast<int64_t>(params.size())}, at::TensorOptions().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  for (size_t i = 0; i < sums.size(); ++i) out[i] = static_cast<float>(std::sqrt(sums[i]));
  return norms;
}

template <typename GradT, bool kMomentum, bool kMask, bool kStatistic>
double sgd_span(const TensorPointers& t, const SgdScalars& scalars, const StatisticRule& statistic_rule,
                int64_t begin, int64_t end) {
  // Local copies: the compiler cannot prove that the stores below leave a referenced struct alone.
  const SgdScalars s = scalars;
  const StatisticRule rule = statistic_rule;
  const GradT* __restrict__ grad = static_cast<const GradT*>(t.grad);
  float* __restrict__ weight = t.weight;
  float* __restrict__ buffer = t.state[0];
  float* __restrict__ statistic = t.statistic;
  const uint8_t* __restrict__ mask = reinterpret_cast<const uint8_t*>(t.mask);
  const uint32_t feedback = lane_mask(t.feedback);
  double error = 0.0;
  for (int64_t block = begin; block < end; block += kErrorBlock) {
    const int64_t block_end = std::min(end, block + kErrorBlock);
    float block_error = 0.0f;
#pragma omp simd reduction(+ : block_error)
    for (int64_t i = block; i < block_end; ++i) {
      const float g = static_cast<float>(grad[i]);
      if (kStatistic) statistic[i] = statistic_update(statistic[i], g, rule);
      const uint32_t kept = kMask ? lane_mask(mask[i] != 0) : ~0u;
      float w = weight[i];
      float b = kMomentum ? buffer[i] : 0.0f;
      sgd_update<kMomentum>(w, b, g, kept | feedback, s);
      weight[i] = w;
      if (kMomentum) buffer[i] = b;
      if (kMask) block_error += keep_where(~kept, w * w);
    }
    error += block_error;
  }
  return error;
}

template <typename GradT, bool kAmsgrad, bool kMask, bool kStatistic>
double adamw_span(const TensorPointers& t, const AdamwScalars& scalars, const StatisticRule& statistic_rule,
                  int64_t begin, int64_t end) {
  const AdamwScalars s = scalars;
  const StatisticRule rule = statistic_rule;
  const GradT* __restrict__ grad = static_cast<const GradT*>(t.grad);
  float* __restrict__ weight = t.weight;
  float* __restrict__ exp_avg = t.state[0];
  float* __restrict__ exp_avg_sq = t.state[1];
  float* __restrict__ max_exp_avg_sq = t.state[2];
  float* __restrict__ statistic = t.statistic;
  const uint8_t* __restrict__ mask = reinterpret_cast<const uint8_t*>(t.mask);
  const uint32_t feedback = lane_mask(t.feedback);
  double error = 0.0;
  for (int64_t block = begin; block < end; block += kErrorBlock) {
    const int64_t block_end = std::min(end, block + kErrorBlock);
    float block_error = 0.0f;
#pragma omp simd reduction(+ : block_error)
    for (int64_t i = block; i < block_end; ++i) {
      const float g = static_cast<float>(grad[i]);
      if (kStatistic) statistic[i] = statistic_update(statistic[i], g, rule);
      const uint32_t kept = kMask ? lane_mask(mask[i] != 0) : ~0u;
      float w = weight[i], m = exp_avg[i], v = exp_avg_sq[i];
      float v_max = kAmsgrad ? max_exp_avg_sq[i] : 0.0f;
      adamw_update<kAmsgrad>(w, m, v, v_max, g, kept | feedback, s);
      weight[i] = w;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if (kAmsgrad) max_exp_avg_sq[i] = v_max;
      if (kMask) block_error += keep_where(~kept, w * w);
    }
    error += block_error;
  }
  return error;
}

at::Tensor sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        const OptionalTensorList& masks, const c10::List<bool>& feedback,
                        at::TensorList statistics, double lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first_step,
                        c10::string_view statistic, std::optional<double> statistic_ema,
                        at::IntArrayRef packed_params, at::TensorList packed_values, at::TensorList packed_row_ptrs,
                        at::TensorList packed_cols, at::IntArrayRef packed_panels) {
  const StatisticRule rule = check_step_inputs("sgd_step", params, grads, masks, feedback, statistics,
                                               std::string_view(statistic.data(), statistic.size()), statistic_ema);
  const SgdScalars scalars =
      check_sgd(params, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
  check_step_packing("sgd_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                     packed_panels);
  const Packing packing{packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels};
  check_packing_plans("sgd_step", params, packing);
  const Prepared prepared = prepare(params, grads, masks, feedback, statistics, {momentum_buffers}, packing);
  const bool with_momentum = !momentum_buffers.empty();
  const bool with_statistic = !statistics.empty();
  return run_spans(params, prepared.tensors, [&](const TensorPointers& t, int64_t begin, int64_t end) {
    return with_grad_type(t.grad_type, [&](auto grad_tag) {
      return with_flag(with_momentum, [&](auto momentum_tag) {
        return with_flag(t.mask != nullptr, [&](auto mask_tag) {
          return with_flag(with_statistic, [&](auto statistic_tag) {
            return sgd_span<decltype(grad_tag), decltype(momentum_tag)::value, decltype(mask_tag)::value,
                            decltype(statistic_tag)::value>(t, scalars, rule, begin, end);
          });
        });
      });
    });
  });
}

at::Tensor adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          const OptionalTensorList& masks, const c10::List<bool>& feedback,
                          at::TensorList statistics, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int64_t step, bool amsgrad, bool maximize,
                          c10::string_view statistic, std::optional<double> statistic_ema,
                          at::IntArrayRef packed_params, at::TensorList packed_values,
                          at::TensorList packed_row_ptrs, at::TensorList packed_cols, at::IntArrayRef packed_panels) {
  const StatisticRule rule = check_step_inputs("adamw_step", params, grads, masks, feedback, statistics,
                                               std::string_view(statistic.data(), statistic.size()), statistic_ema);
  const AdamwScalars scalars = check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps,
                                           weight_decay, step, amsgrad, maximize);
  check_step_packing("adamw_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                     packed_panels);
  const Packing packing{packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels};
  check_packing_plans("adamw_step", params, packing);
  const Prepared prepared =
      prepare(params, grads, masks, feedback, statistics, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, packing);
  const bool with_statistic = !statistics.empty();
  return run_spans(params, prepared.tensors, [&](const TensorPointers& t, int64_t begin, int64_t end) {
    return with_grad_type(t.grad_type, [&](auto grad_tag) {
      return with_flag(amsgrad, [&](auto amsgrad_tag) {
        return with_flag(t.mask != nullptr, [&](auto mask_tag) {
          return with_flag(with_statistic, [&](auto statistic_tag) {
            return adamw_span<decltype(grad_tag), decltype(amsgrad_tag)::value, decltype(mask_tag)::value,
                              decltype(statistic_tag)::value>(t, scalars, rule, begin, end);
          });
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("adamw_step", &adamw_step_cpu);
}

}  // namespace dynasparse
