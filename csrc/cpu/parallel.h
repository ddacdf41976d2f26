// Parallel loops of the CPU kernels that never wait for a thread that has not started.
//
// at::parallel_for (OpenMP) forks a team and joins it at a barrier. With another process on
// one of the cores, a team thread spinning there gets its time slice only when the scheduler
// says, milliseconds late, and every call waits that long: a 0.5 ms forward of a 1024 x 1024
// layer at batch 32 took 16-24 ms with one core busy (torch's default OMP_WAIT_POLICY; it
// stayed at 0.5 ms with PASSIVE, which a library cannot set once torch has loaded OpenMP).
//
// Here the range is cut into chunks claimed from an atomic counter. The calling thread claims
// chunks itself; helpers are tasks on torch's inter-op pool, whose threads sleep until woken
// (a woken thread is scheduled at once). The caller waits only for chunks a helper claimed and
// has not finished; a helper that starts late finds nothing left and returns without touching
// the loop body. A chunk covers the same indices whichever thread runs it, and the kernels'
// loop bodies write disjoint outputs, so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace dynasparse {

namespace detail {

// Chunks per thread: enough that a helper descheduled in the middle of one costs the caller
// a small fraction of the loop.
constexpr int64_t kChunksPerThread = 4;

template <typename Body>
struct ClaimedChunks {
  const Body* body;
  int64_t begin, end, size, count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex error_mutex;
  std::exception_ptr error;

  // Claims and runs one chunk; false once every chunk has been claimed.
  bool run_one() {
    const int64_t index = next.fetch_add(1, std::memory_order_relaxed);
    if (index >= count) return false;
    const int64_t lo = begin + index * size;
    try {
      (*body)(lo, std::min(end, lo + size));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
    finished.fetch_add(1, std::memory_order_acq_rel);
    return true;
  }
};

}  // namespace detail

// Work (multiply-adds, or element copies) below which a loop runs on the calling thread: waking
// a helper and waiting for its chunk measured 15-40 us on 2-core machines, about what 2^19
// multiply-adds of the sparse products take (a 128 x 128 layer's product at 90% sparsity
// and batch 1 took 11.5 us on one thread, 16 us on two; 27 us on two on an AVX2 machine).
constexpr int64_t kMinChunkWork = int64_t{1} << 19;

// The grain for a loop of `length` indices doing `work` in all: at least `grain`, and enough
// indices that a chunk does kMinChunkWork (so a loop with less work runs inline).
inline int64_t work_grain(int64_t length, int64_t work, int64_t grain) {
  if (length <= 0 || work <= 0) return std::max<int64_t>(grain, 1);
  const int64_t per_index = std::max<int64_t>(work / length, 1);
  return std::max<int64_t>(grain, (kMinChunkWork + per_index - 1) / per_index);
}

// at::parallel_for's contract: body(lo, hi) over disjoint subranges covering [begin, end), at
// least `grain` indices each (but the last); the range runs inline on one thread, when it is
// at most one grain, or inside another parallel region.
template <typename Body>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Body& body) {
  if (begin >= end) return;
  const int64_t length = end - begin;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || length <= grain || at::in_parallel_region()) {
    body(begin, end);
    return;
  }
  const int64_t wanted = threads * detail::kChunksPerThread;
  const int64_t size = std::max<int64_t>(grain, (length + wanted - 1) / wanted);
  auto chunks = std::make_shared<detail::ClaimedChunks<Body>>();
  chunks->body = &body;
  chunks->begin = begin;
  chunks->end = end;
  chunks->size = size;
  chunks->count = (length + size - 1) / size;
  const int64_t helpers = std::min<int64_t>(threads, chunks->count) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    at::launch([chunks] {
      while (chunks->run_one()) {
      }
    });
  }
  while (chunks->run_one()) {
  }
  while (chunks->finished.load(std::memory_order_acquire) < chunks->count) {
    std::this_thread::yield();
  }
  if (chunks->error) std::rethrow_exception(chunks->error);
}

}  // namespace dynasparse
