// CPU kernels of the top-k family.
//
// topk_mask / topk_mask_global: radix select. Scores map to unsigned keys that order like
// the scores (-0.0 folded onto 0.0); a few passes, each histogramming the next digit of
// the keys that share the prefix found so far, pin down the key of the k-th largest
// score: O(n) work per pass, O(threads x bins) extra memory, no sort and no copy of the
// scores. A last pass writes the mask: keys above the k-th are kept, and of the keys equal
// to it only the first (k - count above) in flat order, tensor by tensor, which per-chunk
// counts and a prefix sum over the chunks make parallel and deterministic.
//
// nm_mask: every group of m is small and independent: ranks within the group.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "topk.h"

namespace dynasparse {
namespace {

// Keys: IEEE floats are sign-magnitude, so flipping every bit of a negative and only the
// sign bit of a non-negative makes them compare as unsigned integers. Adding +0.0 turns
// -0.0 into +0.0 (and leaves every other value as it is).
template <typename scalar_t>
struct Keys;

template <>
struct Keys<float> {
  using Key = uint32_t;
  static Key key(float x) {
    const float canonical = x + 0.0f;
    uint32_t bits;
    std::memcpy(&bits, &canonical, sizeof(bits));
    return bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
  }
  static bool is_nan(float x) { return x != x; }
  static float value(Key key) {
    const uint32_t bits = (key & 0x80000000u) ? key ^ 0x80000000u : ~key;
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
  }
};

template <>
struct Keys<double> {
  using Key = uint64_t;
  static Key key(double x) {
    const double canonical = x + 0.0;
    uint64_t bits;
    std::memcpy(&bits, &canonical, sizeof(bits));
    return bits ^ (static_cast<uint64_t>(static_cast<int64_t>(bits) >> 63) | 0x8000000000000000ull);
  }
  static bool is_nan(double x) { return x != x; }
  static double value(Key key) {
    const uint64_t bits = (key & 0x8000000000000000ull) ? key ^ 0x8000000000000000ull : ~key;
    double x;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
  }
};

// fp16 and bf16 order on their own 16 bits: half the passes of going through float32.
template <typename scalar_t, uint16_t kExponentBits>
struct SixteenBitKeys {
  using Key = uint16_t;
  static Key key(scalar_t x) {
    const uint16_t bits = x.x == 0x8000 ? 0 : x.x;
    return bits ^ static_cast<uint16_t>(static_cast<uint16_t>(static_cast<int16_t>(bits) >> 15) | 0x8000);
  }
  static bool is_nan(scalar_t x) { return (x.x & 0x7FFF) > kExponentBits; }
  static scalar_t value(Key key) {
    const uint16_t bits = (key & 0x8000) ? key ^ 0x8000 : static_cast<uint16_t>(~key);
    return scalar_t(bits, scalar_t::from_bits());
  }
};

template <>
struct Keys<c10::Half> : SixteenBitKeys<c10::Half, 0x7C00> {};
template <>
struct Keys<c10::BFloat16> : SixteenBitKeys<c10::BFloat16, 0x7F80> {};

// 2048 counters of one pass fit in L1. 16-bit keys take two 8-bit passes.
template <typename Key>
constexpr int kDigitBits = sizeof(Key) == 2 ? 8 : 11;
constexpr int kMaxDigitBits = 11;

// Enough chunks per thread to balance uneven tensors and stalled threads, few enough that
// the per-chunk bookkeeping stays negligible.
constexpr int64_t kMinChunk = 1 << 15;
constexpr int64_t kChunksPerThread = 16;

template <typename scalar_t>
struct Source {
  const scalar_t* scores;
  const bool* candidates;  // nullptr: every element is a candidate
  bool* mask;
  int64_t numel;
};

// A contiguous piece of one source; chunks are ordered by (source, begin), the global
// flat order that ties are broken in.
struct Chunk {
  int64_t source;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels) {
  const int64_t total = std::accumulate(numels.begin(), numels.end(), int64_t{0});
  const int64_t target = at::get_num_threads() * kChunksPerThread;
  const int64_t size = std::max(kMinChunk, (total + target - 1) / std::max<int64_t>(target, 1));
  std::vector<Chunk> chunks;
  for (int64_t source = 0; source < static_cast<int64_t>(numels.size()); ++source) {
    for (int64_t begin = 0; begin < numels[source]; begin += size) {
      chunks.push_back({source, begin, std::min(numels[source], begin + size)});
    }
  }
  return chunks;
}

template <typename scalar_t>
class RadixSelect {
  using Traits = Keys<scalar_t>;
  using Key = typename Traits::Key;
  static constexpr int kKeyBits = 8 * sizeof(Key);
  static constexpr int kDigit = kDigitBits<Key>;

 public:
  RadixSelect(const char* op, bool is_list, std::vector<Source<scalar_t>> sources)
      : op_(op), is_list_(is_list), sources_(std::move(sources)) {
    std::vector<int64_t> numels;
    for (const auto& source : sources_) numels.push_back(source.numel);
    chunks_ = split_into_chunks(numels);
  }

  // Writes the masks; returns the smallest kept score (+inf when k == 0).
  scalar_t run(int64_t k) {
    Key prefix = 0;
    Key prefix_mask = 0;
    int64_t remaining = k;  // how many of the keys that share `prefix` are kept
    int64_t equal_to_kth = 0;
    for (int shift = kKeyBits; shift > 0;) {
      const int bits = std::min(kDigit, shift);
      shift -= bits;
      const bool first = prefix_mask == 0;
      const std::vector<int64_t> counts = first ? histogram<true>(prefix, prefix_mask, shift, bits)
                                                : histogram<false>(prefix, prefix_mask, shift, bits);
      if (first) {
        const int64_t candidates = std::accumulate(counts.begin(), counts.end(), int64_t{0});
        check_k_in_range(op_, k, candidates);
        if (k == 0) {
          write_nothing_kept();
          return std::numeric_limits<scalar_t>::infinity();
        }
      }
      int64_t digit = (int64_t{1} << bits) - 1;
      while (counts[digit] < remaining) remaining -= counts[digit--];
      prefix |= static_cast<Key>(digit) << shift;
      prefix_mask |= static_cast<Key>((int64_t{1} << bits) - 1) << shift;
      equal_to_kth = counts[digit];
    }
    write_masks(prefix, remaining, equal_to_kth);
    return Traits::value(prefix);
  }

 private:
  bool is_candidate(const Source<scalar_t>& source, int64_t i) const {
    return source.candidates == nullptr || source.candidates[i];
  }

  std::string name(int64_t source) const {
    return is_list_ ? "scores[" + std::to_string(source) + "]" : std::string("scores");
  }

  // Blocks small enough to stay in L1 between a vectorized loop over them and a scalar one.
  static constexpr int64_t kBlock = 256;

  // Digits of every candidate's key into `counts` (two interleaved sets of `bins`); true
  // if a candidate is NaN.
  bool count_all_digits(const Chunk& chunk, int shift, int64_t bins, uint32_t* counts) const {
    const Source<scalar_t>& source = sources_[chunk.source];
    const Key digit_mask = static_cast<Key>(bins - 1);
    uint32_t nan = 0;
    std::array<uint16_t, kBlock> digits;
    std::array<uint8_t, kBlock> weights;
    for (int64_t start = chunk.begin; start < chunk.end; start += kBlock) {
      const int64_t length = std::min(kBlock, chunk.end - start);
      const scalar_t* scores = source.scores + start;
      for (int64_t j = 0; j < length; ++j) {
        digits[j] = static_cast<uint16_t>((Traits::key(scores[j]) >> shift) & digit_mask);
      }
      if (source.candidates == nullptr) {
        for (int64_t j = 0; j < length; ++j) nan |= Traits::is_nan(scores[j]);
        int64_t j = 0;
        for (; j + 1 < length; j += 2) {
          ++counts[digits[j]];
          ++counts[bins + digits[j + 1]];
        }
        if (j < length) ++counts[digits[j]];
      } else {
        const bool* candidates = source.candidates + start;
        for (int64_t j = 0; j < length; ++j) {
          weights[j] = candidates[j];
          nan |= candidates[j] & Traits::is_nan(scores[j]);
        }
        int64_t j = 0;
        for (; j + 1 < length; j += 2) {
          counts[digits[j]] += weights[j];
          counts[bins + digits[j + 1]] += weights[j + 1];
        }
        if (j < length) counts[digits[j]] += weights[j];
      }
    }
    return nan != 0;
  }

  // Digits of the candidates' keys that match `prefix` under `prefix_mask`. A vectorized
  // loop flags the matches, skipping blocks without any (most, past the second pass);
  // the matching digits are packed to the front without branches, then counted.
  void count_matching_digits(const Chunk& chunk, Key prefix, Key prefix_mask, int shift, int64_t bins,
                             uint32_t* counts) const {
    const Source<scalar_t>& source = sources_[chunk.source];
    const Key digit_mask = static_cast<Key>(bins - 1);
    std::array<uint16_t, kBlock> digits;
    std::array<uint8_t, kBlock> matches;
    for (int64_t start = chunk.begin; start < chunk.end; start += kBlock) {
      const int64_t length = std::min(kBlock, chunk.end - start);
      const scalar_t* scores = source.scores + start;
      uint32_t any = 0;
      if (source.candidates == nullptr) {
        for (int64_t j = 0; j < length; ++j) {
          const Key key = Traits::key(scores[j]);
          matches[j] = (key & prefix_mask) == prefix;
          digits[j] = static_cast<uint16_t>((key >> shift) & digit_mask);
          any |= matches[j];
        }
      } else {
        const bool* candidates = source.candidates + start;
        for (int64_t j = 0; j < length; ++j) {
          const Key key = Traits::key(scores[j]);
          matches[j] = candidates[j] & ((key & prefix_mask) == prefix);
          digits[j] = static_cast<uint16_t>((key >> shift) & digit_mask);
          any |= matches[j];
        }
      }
      if (!any) continue;
      int64_t matched = 0;
      for (int64_t j = 0; j < length; ++j) {
        digits[matched] = digits[j];
        matched += matches[j];
      }
      for (int64_t j = 0; j < matched; ++j) ++counts[digits[j]];
    }
  }

  // Counts of the digit at `shift` over the candidates whose key matches `prefix` under
  // `prefix_mask`. The first pass matches everything and also looks for NaN.
  template <bool kFirstPass>
  std::vector<int64_t> histogram(Key prefix, Key prefix_mask, int shift, int bits) {
    const int64_t bins = int64_t{1} << bits;
    const int threads = at::get_num_threads();
    std::vector<int64_t> per_thread(threads * bins, 0);
    std::vector<int64_t> first_nan_source(threads, std::numeric_limits<int64_t>::max());
    for_each_chunk([&](const Chunk& chunk) {
      int64_t* totals = per_thread.data() + at::get_thread_num() * bins;
      // Chunk-local 32-bit counters (a chunk is far below 2^32 elements), two sets that
      // alternate so that runs of equal digits do not serialize on one counter.
      std::array<uint32_t, 2 << kMaxDigitBits> local;
      std::fill(local.begin(), local.begin() + 2 * bins, 0u);
      if (kFirstPass) {
        if (count_all_digits(chunk, shift, bins, local.data())) {
          int64_t& first_nan = first_nan_source[at::get_thread_num()];
          first_nan = std::min(first_nan, chunk.source);
        }
      } else {
        count_matching_digits(chunk, prefix, prefix_mask, shift, bins, local.data());
      }
      for (int64_t bin = 0; bin < bins; ++bin) totals[bin] += local[bin] + local[bins + bin];
    });
    if (kFirstPass) {
      const int64_t nan_source = *std::min_element(first_nan_source.begin(), first_nan_source.end());
      TORCH_CHECK_VALUE(nan_source == std::numeric_limits<int64_t>::max(),
                        nan_message(op_, name(nan_source), sources_[nan_source].candidates != nullptr));
    }
    std::vector<int64_t> counts(bins, 0);
    for (int t = 0; t < threads; ++t) {
      for (int64_t bin = 0; bin < bins; ++bin) counts[bin] += per_thread[t * bins + bin];
    }
    return counts;
  }

  // Runs `process(chunk)` over every chunk on the thread pool. Threads claim chunks one at
  // a time, so one that the OS preempts (these machines are shared) leaves its remaining
  // chunks to the others instead of holding them up.
  template <typename F>
  void for_each_chunk(const F& process) const {
    std::atomic<int64_t> next{0};
    const int64_t chunks = static_cast<int64_t>(chunks_.size());
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
      for (int64_t c = next++; c < chunks; c = next++) process(chunks_[c]);
    });
  }

  int64_t index_of(const Chunk& chunk) const { return &chunk - chunks_.data(); }

  void write_nothing_kept() {
    for_each_chunk([&](const Chunk& chunk) {
      std::memset(sources_[chunk.source].mask + chunk.begin, 0, chunk.end - chunk.begin);
    });
  }

  // Keeps keys above `kth`, and the first `keep_equal` of the `equal_to_kth` keys equal to it.
  void write_masks(Key kth, int64_t keep_equal, int64_t equal_to_kth) {
    if (keep_equal == equal_to_kth) {
      for_each_chunk([&](const Chunk& chunk) { write_chunk(chunk, kth, /*keep_equal_keys=*/true); });
      return;
    }
    // Only some of the ties are kept: each chunk learns how many equal keys precede it.
    std::vector<int64_t> equal_before(chunks_.size() + 1, 0);
    for_each_chunk([&](const Chunk& chunk) {
      const Source<scalar_t>& source = sources_[chunk.source];
      int64_t equal = 0;
      for (int64_t i = chunk.begin; i < chunk.end; ++i) {
        equal += (Traits::key(source.scores[i]) == kth) & is_candidate(source, i);
      }
      equal_before[index_of(chunk) + 1] = equal;
    });
    std::partial_sum(equal_before.begin(), equal_before.end(), equal_before.begin());
    for_each_chunk([&](const Chunk& chunk) {
      const int64_t c = index_of(chunk);
      if (equal_before[c + 1] <= keep_equal) {
        write_chunk(chunk, kth, /*keep_equal_keys=*/true);
      } else if (equal_before[c] >= keep_equal) {
        write_chunk(chunk, kth, /*keep_equal_keys=*/false);
      } else {
        write_boundary_chunk(chunk, kth, keep_equal - equal_before[c]);
      }
    });
  }

  // Keeps keys above `kth`, and keys equal to it when `keep_equal_keys`.
  void write_chunk(const Chunk& chunk, Key kth, bool keep_equal_keys) const {
    const Source<scalar_t>& source = sources_[chunk.source];
    // Nothing is above the largest key; below it, key > kth is key >= kth + 1, one
    // comparison for both cases.
    if (!keep_equal_keys && kth == std::numeric_limits<Key>::max()) {
      std::memset(source.mask + chunk.begin, 0, chunk.end - chunk.begin);
      return;
    }
    const Key lowest_kept = keep_equal_keys ? kth : static_cast<Key>(kth + 1);
    if (source.candidates == nullptr) {
      for (int64_t i = chunk.begin; i < chunk.end; ++i) source.mask[i] = Traits::key(source.scores[i]) >= lowest_kept;
    } else {
      for (int64_t i = chunk.begin; i < chunk.end; ++i) {
        source.mask[i] = source.candidates[i] & (Traits::key(source.scores[i]) >= lowest_kept);
      }
    }
  }

  // The one chunk where the kept keys equal to `kth` run out: the first `ties_left` stay.
  void write_boundary_chunk(const Chunk& chunk, Key kth, int64_t ties_left) const {
    const Source<scalar_t>& source = sources_[chunk.source];
    for (int64_t i = chunk.begin; i < chunk.end; ++i) {
      const Key key = Traits::key(source.scores[i]);
      const bool candidate = is_candidate(source, i);
      const bool tie = candidate && key == kth && ties_left > 0;
      ties_left -= tie;
      source.mask[i] = (candidate && key > kth) || tie;
    }
  }

  const char* op_;
  bool is_list_;
  std::vector<Source<scalar_t>> sources_;
  std::vector<Chunk> chunks_;
};

at::Tensor threshold_tensor(const at::Tensor& like, c10::Scalar value) {
  return at::full({}, value, like.options());
}

std::tuple<at::Tensor, at::Tensor> topk_mask_cpu(const at::Tensor& scores_in, int64_t k,
                                                 const std::optional<at::Tensor>& candidates_in) {
  check_topk_mask(scores_in, k, candidates_in);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor candidates = candidates_in.has_value() ? candidates_in->contiguous() : at::Tensor();
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  at::Tensor threshold;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_mask_cpu", [&] {
    Source<scalar_t> source{scores.const_data_ptr<scalar_t>(),
                            candidates.defined() ? candidates.const_data_ptr<bool>() : nullptr,
                            mask.mutable_data_ptr<bool>(), scores.numel()};
    threshold = threshold_tensor(scores, RadixSelect<scalar_t>("topk_mask", false, {source}).run(k));
  });
  return {mask, threshold};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> topk_mask_global_cpu(at::TensorList scores_in, int64_t k) {
  check_topk_mask_global(scores_in, k);
  if (scores_in.empty()) {
    return {std::vector<at::Tensor>(),
            at::full({}, std::numeric_limits<float>::infinity(), at::TensorOptions().dtype(at::kFloat))};
  }
  std::vector<at::Tensor> scores;
  std::vector<at::Tensor> masks;
  for (const at::Tensor& tensor : scores_in) {
    scores.push_back(tensor.contiguous());
    masks.push_back(at::empty(tensor.sizes(), tensor.options().dtype(at::kBool)));
  }
  at::Tensor threshold;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores[0].scalar_type(), "topk_mask_global_cpu", [&] {
    std::vector<Source<scalar_t>> sources;
    for (size_t i = 0; i < scores.size(); ++i) {
      sources.push_back({scores[i].const_data_ptr<scalar_t>(), nullptr, masks[i].mutable_data_ptr<bool>(),
                         scores[i].numel()});
    }
    threshold = threshold_tensor(scores[0], RadixSelect<scalar_t>("topk_mask_global", true, std::move(sources)).run(k));
  });
  return {masks, threshold};
}

// Groups of up to this size rank by pairwise comparison (m^2 work, no buffers); larger
// ones select with nth_element on a per-thread index buffer.
constexpr int64_t kPairwiseGroup = 32;

template <typename scalar_t>
void nm_mask_kernel(const scalar_t* scores, bool* mask, int64_t groups, int64_t n, int64_t m) {
  using Traits = Keys<scalar_t>;
  using Key = typename Traits::Key;
  std::vector<char> nan_in_thread(at::get_num_threads(), 0);
  const int64_t grain = std::max<int64_t>(1, 4096 / m);
  at::parallel_for(0, groups, grain, [&](int64_t group_begin, int64_t group_end) {
    bool nan = false;
    std::vector<Key> keys(m);
    std::vector<int64_t> order(m > kPairwiseGroup ? m : 0);
    for (int64_t g = group_begin; g < group_end; ++g) {
      const scalar_t* group = scores + g * m;
      bool* out = mask + g * m;
      for (int64_t j = 0; j < m; ++j) {
        nan |= Traits::is_nan(group[j]);
        keys[j] = Traits::key(group[j]);
      }
      if (m <= kPairwiseGroup) {
        for (int64_t j = 0; j < m; ++j) {
          int64_t rank = 0;
          for (int64_t i = 0; i < m; ++i) rank += (keys[i] > keys[j]) | ((keys[i] == keys[j]) & (i < j));
          out[j] = rank < n;
        }
      } else {
        std::iota(order.begin(), order.end(), int64_t{0});
        auto before = [&](int64_t a, int64_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
        if (n > 0 && n < m) std::nth_element(order.begin(), order.begin() + n, order.end(), before);
        std::memset(out, 0, m);
        for (int64_t j = 0; j < n; ++j) out[order[j]] = true;
      }
    }
    if (nan) nan_in_thread[at::get_thread_num()] = 1;
  });
  TORCH_CHECK_VALUE(std::none_of(nan_in_thread.begin(), nan_in_thread.end(), [](char nan) { return nan; }),
                    nan_message("nm_mask", "scores", false));
}

at::Tensor nm_mask_cpu(const at::Tensor& scores_in, int64_t n, int64_t m) {
  check_nm_mask(scores_in, n, m);
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor mask = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nm_mask_cpu", [&] {
    nm_mask_kernel(scores.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<bool>(), scores.numel() / m, n, m);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynasparse, CPU, m) {
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("topk_mask_global", &topk_mask_global_cpu);
  m.impl("nm_mask", &nm_mask_cpu);
}

}  // namespace dynasparse
