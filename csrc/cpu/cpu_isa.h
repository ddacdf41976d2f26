// The vector instruction set the CPU kernels run: the best this CPU has, unless a caller capped
// it (set_cpu_isa_cap) so that one machine can run, and so test, every kernel below its own
// level. Chosen at run time, so the build needs no -march flag.
#pragma once

#include <algorithm>
#include <atomic>

namespace dynasparse {

// Ordered: each level's kernels need the instructions of the levels below it as well.
enum class CpuIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detected_cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  // Every AVX-512 CPU has BMI2 (the plan check's lane masks use it); AVX2 kernels need FMA.
  static const CpuIsa detected = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
    return CpuIsa::kPortable;
  }();
  return detected;
#else
  return CpuIsa::kPortable;
#endif
}

inline std::atomic<int>& cpu_isa_cap() {
  static std::atomic<int> cap{static_cast<int>(CpuIsa::kAvx512)};
  return cap;
}

// Read once per op, before its kernels start (a cap set while an op runs applies to the next).
inline CpuIsa cpu_isa() {
  return static_cast<CpuIsa>(std::min(static_cast<int>(detected_cpu_isa()), cpu_isa_cap().load()));
}

inline void set_cpu_isa_cap(CpuIsa cap) { cpu_isa_cap().store(static_cast<int>(cap)); }

inline bool has_avx512() { return cpu_isa() == CpuIsa::kAvx512; }
inline bool has_avx2() { return cpu_isa() >= CpuIsa::kAvx2; }

}  // namespace dynasparse
