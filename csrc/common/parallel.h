// Threads over independent blocks of rows for the CPU kernels.
//
// Work is cut into fixed-size blocks whatever the thread count, so per-block partial sums (and
// therefore reductions) come out bit-identical with 1 or 64 threads. Threads are plain
// std::thread: no second OpenMP runtime next to the one torch ships.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

// Hot CPU loops are compiled for AVX2 and for the baseline x86-64 ISA; the loader picks the best
// one for the running CPU (GCC function multiversioning), so one build runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYFAST_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYFAST_SIMD_CLONES
#endif

namespace pyfast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(block_index) for block_index in [0, num_blocks) on up to `num_threads` threads.
// Blocks are dealt out in contiguous ranges; the calling thread takes the first range.
// `min_blocks_per_thread` keeps tiny problems on one thread, where a thread start costs more
// than the work.
template <class Fn>
void parallel_blocks(int64_t num_blocks, int num_threads, int64_t min_blocks_per_thread, Fn&& fn) {
  if (num_blocks <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, num_blocks / std::max<int64_t>(1, min_blocks_per_thread));
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, by_work)));
  auto run_range = [&](int t) {
    const int64_t begin = num_blocks * t / threads;
    const int64_t end = num_blocks * (t + 1) / threads;
    for (int64_t b = begin; b < end; ++b) fn(b);
  };
  if (threads == 1) {
    run_range(0);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) workers.emplace_back(run_range, t);
  run_range(0);
  for (auto& w : workers) w.join();
}

}  // namespace pyfast
