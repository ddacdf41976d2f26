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
//
// rigl_masks: RigL's drop and grow in one pass (see the kernel's comment).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "panels.h"
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

// Runs `process(chunk)` over every chunk on the thread pool. Threads claim chunks one at a
// time, so one that the OS preempts (these machines are shared) leaves its remaining chunks
// to the others instead of holding them up.
template <typename F>
void run_chunks(const std::vector<Chunk>& chunks, const F& process) {
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < count; c = next++) process(chunks[c]);
  });
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

  template <typename F>
  void for_each_chunk(const F& process) const {
    run_chunks(chunks_, process);
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

// rigl_masks: RigL's drop and grow of one layer in one pass (after a sample of 1/33 of it).
// Among the active weights the `active - k` of largest |weight| stay; among the inactive ones
// the k of largest |grad| grow; ties to the lower flat index, as in topk_mask. The sample
// places a bracket of keys around each selection's threshold; the pass then decides every
// element whose key lies outside its bracket and collects the ones inside with their
// indices, and an exact selection among the collected finishes (their count is a small
// fraction of the layer). Where the sample misjudged (a threshold outside its bracket) or
// ties crowd a bracket beyond its budget, that selection is made again by the radix select
// over the whole layer: the same result either way, only slower.

// |x| as a signed integer of x's width that orders like |x| (the sign bit cleared, so it is
// never negative; NaN above +inf). Signed, so that the vectorized pass compares with the
// instructions every x86-64 has.
template <typename scalar_t>
struct Magnitude;

template <>
struct Magnitude<float> {
  using Key = int32_t;
  static constexpr Key kInfinity = 0x7F800000;
  static Key of(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bits & 0x7FFFFFFF;
  }
};

template <>
struct Magnitude<double> {
  using Key = int64_t;
  static constexpr Key kInfinity = 0x7FF0000000000000;
  static Key of(double x) {
    int64_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bits & 0x7FFFFFFFFFFFFFFF;
  }
};

template <typename scalar_t, int16_t kInfinityBits>
struct SixteenBitMagnitude {
  using Key = int16_t;
  static constexpr Key kInfinity = kInfinityBits;
  static Key of(scalar_t x) { return static_cast<int16_t>(x.x & 0x7FFF); }
};

template <>
struct Magnitude<c10::Half> : SixteenBitMagnitude<c10::Half, 0x7C00> {};
template <>
struct Magnitude<c10::BFloat16> : SixteenBitMagnitude<c10::BFloat16, 0x7F80> {};

// Layers up to this size skip the sample: every candidate is collected.
constexpr int64_t kSampleAll = int64_t{1} << 16;
// The sample: runs of kSampleRun elements (two cache lines of fp32), one at the start of
// every kSamplePeriod. The period is an odd multiple of the run, so that in a matrix whose
// rows are a power of two long (most layers) the runs fall on every column as well as every
// row: the gradient's magnitudes vary by row (output unit) and by column (input unit). The
// runs are too far apart for the hardware prefetchers: the loop prefetches kSampleAhead runs
// ahead.
constexpr int64_t kSampleRun = 32;
constexpr int64_t kSamplePeriod = 33 * kSampleRun;
constexpr int64_t kSampleAhead = 8;
// Collected elements of one selection beyond which it is made by the radix select instead.
constexpr int64_t kMinBudget = kSampleAll;
constexpr int64_t kBudgetDivisor = 16;
// Blocks between two reports of a chunk's collected counts to the shared budget.
constexpr int64_t kBudgetBlocks = 64;

template <typename Key>
struct Bracket {
  // Keys above `selected_above` are selected outright, keys in (collected_above,
  // selected_above] are collected, the others are not selected. The defaults collect all.
  Key selected_above = std::numeric_limits<Key>::max();
  Key collected_above = -1;
};

// The bracket around the threshold that selects `fraction` of the candidates, from a sample
// of their keys: the sampled rank of the threshold +- 8 binomial standard deviations (and
// some slack for the runs' correlation), so the sample misleads only very rarely. The ranks
// are placed on a histogram of the keys' top 16 bits (1/128 of an octave for floats), each
// widened to its whole bucket: cheaper than ordering the sample, and only a little wider.
template <typename Key>
Bracket<Key> bracket_from_sample(const std::vector<Key>& sample, double fraction) {
  Bracket<Key> bracket;
  const int64_t m = static_cast<int64_t>(sample.size());
  if (m == 0) return bracket;
  fraction = std::min(1.0, std::max(0.0, fraction));
  const double rank = fraction * static_cast<double>(m);
  const double spread = 8.0 * std::sqrt(rank * (1.0 - fraction)) + 32.0;
  // Samples surely above the threshold, and the most that may be.
  const int64_t certain = static_cast<int64_t>(std::floor(rank - spread));
  const int64_t possible = static_cast<int64_t>(std::ceil(rank + spread));
  constexpr int kMagnitudeBits = 8 * sizeof(Key) - 1;
  constexpr int kShift = std::max(0, kMagnitudeBits - 16);
  std::vector<int64_t> counts(int64_t{1} << (kMagnitudeBits - kShift), 0);
  for (const Key key : sample) ++counts[key >> kShift];
  int64_t above = 0;  // samples in the buckets above `bucket`
  for (int64_t bucket = static_cast<int64_t>(counts.size()) - 1; bucket >= 0; --bucket) {
    const int64_t through = above + counts[bucket];
    if (certain >= 1 && above < certain && through >= certain) {
      // Keys above this bucket are fewer than `certain`: selected outright.
      bracket.selected_above = static_cast<Key>(((static_cast<uint64_t>(bucket) + 1) << kShift) - 1);
    }
    if (possible < m && above <= possible && through > possible) {
      // Keys from this bucket up are more than `possible`: the bracket reaches down to it.
      bracket.collected_above = static_cast<Key>((static_cast<uint64_t>(bucket) << kShift) - 1);
      break;
    }
    above = through;
  }
  return bracket;
}

template <typename Key>
struct Collected {
  // Indices decided in the pass (dropped below the drop bracket, grown above the grow
  // bracket) and the (key, index) pairs inside the bracket, both in ascending index order.
  std::vector<int64_t> decided;
  std::vector<std::pair<Key, int64_t>> bracket;
  // The collected ones that join the decided: dropped (not selected) or grown (selected).
  std::vector<int64_t> chosen;
};

// Elements per block of the pass: the per-block records fit in L1.
constexpr int64_t kEventBlock = 256;

template <typename Key>
struct BlockEvents {
  // Offsets in the block of the elements the pass records, by kind: dropped (below the
  // drop bracket), grown (above the grow bracket), and collected in either bracket (with
  // their keys).
  std::array<int32_t, kEventBlock> dropped_at, grown_at, drop_collected_at, grow_collected_at;
  std::array<Key, kEventBlock> drop_keys, grow_keys;
  int64_t dropped = 0, grown = 0, drop_collected = 0, grow_collected = 0;
  int64_t active = 0, kept = 0, stray = 0;
  bool nan_weight = false, nan_grad = false;
};

#if DYNASPARSE_X86
// classify_block for float32 with AVX-512: 16 elements a step, the records compressed into
// their lists by mask (vpcompressd) instead of a scalar pass over the block.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi2,popcnt"))) void classify_float_avx512(
    const uint8_t* mask, const float* weight, const float* grad, uint8_t* out, int64_t length,
    const Bracket<int32_t>& drop, const Bracket<int32_t>& grow, BlockEvents<int32_t>& events) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i infinity = _mm512_set1_epi32(Magnitude<float>::kInfinity);
  const __m512i drop_selected = _mm512_set1_epi32(drop.selected_above);
  const __m512i drop_collected = _mm512_set1_epi32(drop.collected_above);
  const __m512i grow_selected = _mm512_set1_epi32(grow.selected_above);
  const __m512i grow_collected = _mm512_set1_epi32(grow.collected_above);
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t dropped = 0, grown = 0, drop_count = 0, grow_count = 0, active = 0, kept = 0, stray = 0;
  __mmask16 nan_weight = 0, nan_grad = 0;
  for (int64_t j = 0; j < length; j += 16) {
    const __mmask16 lanes = length - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (length - j)) - 1);
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, mask + j);
    const __mmask16 a = _mm_test_epi8_mask(bytes, bytes);
    const __mmask16 inactive = lanes & ~a;
    const __m512i w = _mm512_and_si512(_mm512_maskz_loadu_epi32(lanes, weight + j), magnitude);
    const __m512i g = _mm512_and_si512(_mm512_maskz_loadu_epi32(lanes, grad + j), magnitude);
    const __m512i key = _mm512_mask_blend_epi32(a, g, w);
    const __mmask16 selected =
        lanes & _mm512_cmpgt_epi32_mask(key, _mm512_mask_blend_epi32(a, grow_selected, drop_selected));
    const __mmask16 inside =
        lanes & _mm512_cmpgt_epi32_mask(key, _mm512_mask_blend_epi32(a, grow_collected, drop_collected));
    _mm_mask_storeu_epi8(out + j, lanes, _mm_maskz_set1_epi8(selected, 1));
    const __mmask16 drop_below = a & ~inside;
    const __mmask16 drop_inside = a & inside & ~selected;
    const __mmask16 grow_above = inactive & selected;
    const __mmask16 grow_inside = inactive & inside & ~selected;
    if (drop_below | drop_inside | grow_above | grow_inside) {
      _mm512_mask_compressstoreu_epi32(events.dropped_at.data() + dropped, drop_below, index);
      _mm512_mask_compressstoreu_epi32(events.grown_at.data() + grown, grow_above, index);
      _mm512_mask_compressstoreu_epi32(events.drop_collected_at.data() + drop_count, drop_inside, index);
      _mm512_mask_compressstoreu_epi32(events.drop_keys.data() + drop_count, drop_inside, key);
      _mm512_mask_compressstoreu_epi32(events.grow_collected_at.data() + grow_count, grow_inside, index);
      _mm512_mask_compressstoreu_epi32(events.grow_keys.data() + grow_count, grow_inside, key);
      dropped += _mm_popcnt_u32(drop_below);
      grown += _mm_popcnt_u32(grow_above);
      drop_count += _mm_popcnt_u32(drop_inside);
      grow_count += _mm_popcnt_u32(grow_inside);
    }
    index = _mm512_add_epi32(index, step);
    active += _mm_popcnt_u32(a);
    kept += _mm_popcnt_u32(a & selected);
    stray += _mm_popcnt_u32(inactive & _mm512_test_epi32_mask(w, w));
    nan_weight |= a & _mm512_cmpgt_epi32_mask(w, infinity);
    nan_grad |= inactive & _mm512_cmpgt_epi32_mask(g, infinity);
  }
  events.dropped = dropped;
  events.grown = grown;
  events.drop_collected = drop_count;
  events.grow_collected = grow_count;
  events.active = active;
  events.kept = kept;
  events.stray = stray;
  events.nan_weight = nan_weight != 0;
  events.nan_grad = nan_grad != 0;
}
#endif

template <typename scalar_t>
class RiglSelect {
  using M = Magnitude<scalar_t>;
  using Key = typename M::Key;
  using Entry = std::pair<Key, int64_t>;

 public:
  RiglSelect(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& grad, at::Tensor& out)
      : weight_(weight.const_data_ptr<scalar_t>()),
        // bool is one byte: read and written as bytes, so that the pass vectorizes.
        mask_(reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>())),
        grad_(grad.const_data_ptr<scalar_t>()),
        out_(reinterpret_cast<uint8_t*>(out.mutable_data_ptr<bool>())),
        numel_(weight.numel()),
        weight_tensor_(weight),
        mask_tensor_(mask),
        grad_tensor_(grad),
        out_tensor_(out),
        chunks_(split_into_chunks({weight.numel()})),
        drop_(chunks_.size()),
        grow_(chunks_.size()),
        counts_(chunks_.size()),
        budget_(std::max(kMinBudget, numel_ / kBudgetDivisor)) {}

  // Writes the new mask; returns the dropped and the grown indices and the number of
  // inactive weights that are not zero.
  std::tuple<at::Tensor, at::Tensor, int64_t> run(int64_t k) {
    place_brackets(k);
    for_each_chunk([&](const Chunk& chunk) { pass(chunk); });
    int64_t active = 0, kept_outright = 0, stray = 0, dropped_decided = 0, grown_decided = 0, grow_collected = 0;
    bool nan_weight = false, nan_grad = false;
    for (size_t c = 0; c < chunks_.size(); ++c) {
      active += counts_[c].active;
      kept_outright += counts_[c].kept_outright;
      stray += counts_[c].stray;
      nan_weight |= counts_[c].nan_weight;
      nan_grad |= counts_[c].nan_grad;
      dropped_decided += static_cast<int64_t>(drop_[c].decided.size());
      grown_decided += static_cast<int64_t>(grow_[c].decided.size());
      grow_collected += static_cast<int64_t>(grow_[c].bracket.size());
    }
    TORCH_CHECK_VALUE(!nan_weight, "dynasparse.rigl_masks: weight contains NaN among the active weights (NaN has "
                      "no rank)");
    TORCH_CHECK_VALUE(!nan_grad, "dynasparse.rigl_masks: grad contains NaN among the inactive weights (NaN has no "
                      "rank)");
    check_rigl_k(k, active, numel_ - active);
    const int64_t keep = active - k;
    // A selection over budget stopped collecting, so its counts are incomplete: made again.
    const bool drop_fits = !drop_over_budget_ && kept_outright <= keep && dropped_decided <= k;
    const bool grow_fits = !grow_over_budget_ && grown_decided <= k && k <= grown_decided + grow_collected;
    at::Tensor dropped = drop_fits ? finish(drop_, keep - kept_outright, /*chosen_selected=*/false, k)
                                   : redo(weight_tensor_, mask_tensor_, keep, /*grow=*/false);
    at::Tensor grown = grow_fits ? finish(grow_, k - grown_decided, /*chosen_selected=*/true, k)
                                 : redo(grad_tensor_, at::logical_not(mask_tensor_), k, /*grow=*/true);
    return {dropped, grown, stray};
  }

 private:
  struct Counts {
    int64_t active = 0;
    int64_t kept_outright = 0;
    int64_t stray = 0;  // inactive weights that are not zero
    bool nan_weight = false;
    bool nan_grad = false;
  };

  void place_brackets(int64_t k) {
    if (numel_ <= kSampleAll) return;  // the default brackets collect everything
    const int64_t most = (numel_ + kSamplePeriod - 1) / kSamplePeriod * kSampleRun;
    std::vector<Key> active_keys(most), inactive_keys(most);
    int64_t sampled = 0, active_sampled = 0;
    for (int64_t start = 0; start < numel_; start += kSamplePeriod) {
      const int64_t end = std::min(numel_, start + kSampleRun);
      const int64_t ahead = start + kSampleAhead * kSamplePeriod;
      if (ahead + kSampleRun <= numel_) {
        for (int64_t line = 0; line < kSampleRun * static_cast<int64_t>(sizeof(scalar_t)); line += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(weight_ + ahead) + line);
          __builtin_prefetch(reinterpret_cast<const char*>(grad_ + ahead) + line);
        }
        __builtin_prefetch(mask_ + ahead);
      }
      for (int64_t i = start; i < end; ++i) {
        // Both written, one kept: no branch on the mask.
        const int64_t a = mask_[i] != 0;
        active_keys[active_sampled] = M::of(weight_[i]);
        inactive_keys[sampled - active_sampled] = M::of(grad_[i]);
        active_sampled += a;
        ++sampled;
      }
    }
    active_keys.resize(active_sampled);
    inactive_keys.resize(sampled - active_sampled);
    const double active = static_cast<double>(active_sampled) / static_cast<double>(sampled) * numel_;
    const double inactive = static_cast<double>(numel_) - active;
    drop_bracket_ = bracket_from_sample(active_keys, active > 0 ? (active - k) / active : 1.0);
    grow_bracket_ = bracket_from_sample(inactive_keys, inactive > 0 ? k / inactive : 0.0);
  }

  void pass(const Chunk& chunk) {
    const int64_t c = index_of(chunk);
    Collected<Key>& drop = drop_[c];
    Collected<Key>& grow = grow_[c];
    Counts counts;
    BlockEvents<Key> events;
    size_t drop_reported = 0, grow_reported = 0;
    int64_t blocks = 0;
    for (int64_t start = chunk.begin; start < chunk.end; start += kEventBlock) {
      const int64_t length = std::min(kEventBlock, chunk.end - start);
      classify(start, length, events);
      counts.active += events.active;
      counts.kept_outright += events.kept;
      counts.stray += events.stray;
      counts.nan_weight |= events.nan_weight;
      counts.nan_grad |= events.nan_grad;
      if (!drop_over_budget_.load(std::memory_order_relaxed)) {
        for (int64_t e = 0; e < events.dropped; ++e) drop.decided.push_back(start + events.dropped_at[e]);
        for (int64_t e = 0; e < events.drop_collected; ++e) {
          drop.bracket.push_back({events.drop_keys[e], start + events.drop_collected_at[e]});
        }
      }
      if (!grow_over_budget_.load(std::memory_order_relaxed)) {
        for (int64_t e = 0; e < events.grown; ++e) grow.decided.push_back(start + events.grown_at[e]);
        for (int64_t e = 0; e < events.grow_collected; ++e) {
          grow.bracket.push_back({events.grow_keys[e], start + events.grow_collected_at[e]});
        }
      }
      if (++blocks % kBudgetBlocks == 0 || start + kEventBlock >= chunk.end) {
        report(drop, drop_reported, drop_collected_, drop_over_budget_);
        report(grow, grow_reported, grow_collected_, grow_over_budget_);
      }
    }
    counts_[c] = counts;
  }

  void classify(int64_t start, int64_t length, BlockEvents<Key>& events) const {
#if DYNASPARSE_X86
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (has_avx512()) {
        classify_float_avx512(mask_ + start, weight_ + start, grad_ + start, out_ + start, length, drop_bracket_,
                              grow_bracket_, events);
        return;
      }
    }
#endif
    classify_block(mask_ + start, weight_ + start, grad_ + start, out_ + start, length, events);
  }

  // One block of the pass: the new mask's provisional values (selected outright) and what
  // the pass records. Branch-free over the block, so that it vectorizes (a block's counts fit
  // in Key); `all` is all ones for an active element.
  void classify_block(const uint8_t* mask, const scalar_t* weight, const scalar_t* grad, uint8_t* out, int64_t length,
                      BlockEvents<Key>& events) const {
    const Key drop_selected = drop_bracket_.selected_above, drop_collected = drop_bracket_.collected_above;
    const Key grow_selected = grow_bracket_.selected_above, grow_collected = grow_bracket_.collected_above;
    std::array<uint8_t, kEventBlock> recorded;
    Key any = 0, active = 0, kept = 0, stray = 0, nan_weight = 0, nan_grad = 0;
    for (int64_t j = 0; j < length; ++j) {
      const Key a = mask[j] != 0;
      const Key all = static_cast<Key>(-a);
      const Key w = M::of(weight[j]);
      const Key g = M::of(grad[j]);
      const Key key = static_cast<Key>((w & all) | (g & ~all));
      const Key selected = key > static_cast<Key>((drop_selected & all) | (grow_selected & ~all));
      const Key inside = key > static_cast<Key>((drop_collected & all) | (grow_collected & ~all));
      out[j] = static_cast<uint8_t>(selected);
      // Active: dropped or collected unless kept outright; inactive: grown or collected.
      const Key record = static_cast<Key>((a & (selected ^ 1)) | ((a ^ 1) & inside));
      recorded[j] = static_cast<uint8_t>(record);
      any |= record;
      active += a;
      kept += a & selected;
      stray += (a ^ 1) & (w != 0);
      nan_weight |= a & (w > M::kInfinity);
      nan_grad |= (a ^ 1) & (g > M::kInfinity);
    }
    events.active = active;
    events.kept = kept;
    events.stray = stray;
    events.nan_weight = nan_weight != 0;
    events.nan_grad = nan_grad != 0;
    events.dropped = events.grown = events.drop_collected = events.grow_collected = 0;
    if (!any) return;
    for (int32_t j = 0; j < length; ++j) {
      if (!recorded[j]) continue;
      if (mask[j]) {
        const Key key = M::of(weight[j]);
        if (key > drop_collected) {
          events.drop_keys[events.drop_collected] = key;
          events.drop_collected_at[events.drop_collected++] = j;
        } else {
          events.dropped_at[events.dropped++] = j;
        }
      } else {
        const Key key = M::of(grad[j]);
        if (key > grow_selected) {
          events.grown_at[events.grown++] = j;
        } else {
          events.grow_keys[events.grow_collected] = key;
          events.grow_collected_at[events.grow_collected++] = j;
        }
      }
    }
  }

  void report(const Collected<Key>& collected, size_t& reported, std::atomic<int64_t>& total,
              std::atomic<bool>& over_budget) const {
    const size_t now = collected.decided.size() + collected.bracket.size();
    const int64_t added = static_cast<int64_t>(now - reported);
    if (total.fetch_add(added, std::memory_order_relaxed) + added > budget_) {
      over_budget.store(true, std::memory_order_relaxed);
    }
    reported = now;
  }

  // Selects `wanted` of the collected bracket entries (largest keys, then lower indices),
  // marks them in the mask and returns the selection's indices, ascending: the dropped ones
  // (decided, and collected but not selected) or the grown ones (decided, and selected).
  at::Tensor finish(std::vector<Collected<Key>>& collected, int64_t wanted, bool chosen_selected, int64_t k) {
    std::vector<Entry> all;
    for (const auto& chunk : collected) all.insert(all.end(), chunk.bracket.begin(), chunk.bracket.end());
    auto before = [](const Entry& a, const Entry& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    // The last selected entry (unused when wanted == 0: nothing is selected).
    Entry last{0, -1};
    if (wanted > 0) {
      std::nth_element(all.begin(), all.begin() + (wanted - 1), all.end(), before);
      last = all[wanted - 1];
    }
    for_each_chunk([&](const Chunk& chunk) {
      Collected<Key>& mine = collected[index_of(chunk)];
      for (const Entry& entry : mine.bracket) {
        const bool selected = wanted > 0 && !before(last, entry);
        if (selected) out_[entry.second] = 1;
        if (selected == chosen_selected) mine.chosen.push_back(entry.second);
      }
    });
    std::vector<int64_t> offsets(collected.size() + 1, 0);
    for (size_t c = 0; c < collected.size(); ++c) {
      offsets[c + 1] = offsets[c] + static_cast<int64_t>(collected[c].decided.size() + collected[c].chosen.size());
    }
    TORCH_INTERNAL_ASSERT(offsets.back() == k, "dynasparse.rigl_masks: selected ", offsets.back(), " of ", k);
    at::Tensor indices = at::empty({k}, weight_tensor_.options().dtype(at::kLong));
    int64_t* target = indices.mutable_data_ptr<int64_t>();
    for_each_chunk([&](const Chunk& chunk) {
      const int64_t c = index_of(chunk);
      const Collected<Key>& mine = collected[c];
      std::merge(mine.decided.begin(), mine.decided.end(), mine.chosen.begin(), mine.chosen.end(), target + offsets[c]);
    });
    return indices;
  }

  // The radix select over the whole layer for a selection its bracket missed: `wanted` of
  // the largest |scores| among `candidates`, written into the mask at the candidates'
  // positions; returns the dropped (drop) or the grown (grow) indices, ascending.
  at::Tensor redo(const at::Tensor& scores, const at::Tensor& candidates, int64_t wanted, bool grow) {
    const at::Tensor magnitudes = scores.abs();
    at::Tensor selected = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
    RadixSelect<scalar_t>("rigl_masks", false,
                          {Source<scalar_t>{magnitudes.const_data_ptr<scalar_t>(), candidates.const_data_ptr<bool>(),
                                            selected.mutable_data_ptr<bool>(), numel_}})
        .run(wanted);
    out_tensor_.copy_(at::where(candidates, selected, out_tensor_));
    const at::Tensor chosen = grow ? selected : at::logical_and(candidates, at::logical_not(selected));
    return at::nonzero(chosen.reshape(-1)).reshape(-1);
  }

  template <typename F>
  void for_each_chunk(const F& process) const {
    run_chunks(chunks_, process);
  }

  int64_t index_of(const Chunk& chunk) const { return &chunk - chunks_.data(); }

  const scalar_t* weight_;
  const uint8_t* mask_;
  const scalar_t* grad_;
  uint8_t* out_;
  int64_t numel_;
  const at::Tensor& weight_tensor_;
  const at::Tensor& mask_tensor_;
  const at::Tensor& grad_tensor_;
  at::Tensor& out_tensor_;
  std::vector<Chunk> chunks_;
  std::vector<Collected<Key>> drop_;
  std::vector<Collected<Key>> grow_;
  std::vector<Counts> counts_;
  Bracket<Key> drop_bracket_;
  Bracket<Key> grow_bracket_;
  const int64_t budget_;
  std::atomic<int64_t> drop_collected_{0};
  std::atomic<int64_t> grow_collected_{0};
  std::atomic<bool> drop_over_budget_{false};
  std::atomic<bool> grow_over_budget_{false};
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rigl_masks_cpu(const at::Tensor& weight_in,
                                                                          const at::Tensor& mask_in,
                                                                          const at::Tensor& grad_in, int64_t k) {
  check_rigl_masks(weight_in, mask_in, grad_in, k);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(at::kBool));
  at::Tensor dropped, grown;
  int64_t stray = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "rigl_masks_cpu", [&] {
    std::tie(dropped, grown, stray) = RiglSelect<scalar_t>(weight, mask, grad, out).run(k);
  });
  return {out, dropped, grown, at::scalar_tensor(stray, weight.options().dtype(at::kLong))};
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
  m.impl("rigl_masks", &rigl_masks_cpu);
}

}  // namespace dynasparse
