// Threads over independent blocks of rows for the CPU kernels.
//
// Work is cut into fixed-size blocks whatever the thread count, so per-block partial sums (and
// therefore reductions) come out bit-identical with 1 or 64 threads.
//
// The blocks run on the threads torch's own kernels use: pyfast._C does not link an OpenMP
// runtime, but at run time it finds the one torch loaded (GOMP_parallel, exported by libgomp and,
// for GCC compatibility, by LLVM's and Intel's runtimes) and runs its blocks as an OpenMP parallel
// region, on the workers that are still warm from the torch op before. Where no runtime is loaded,
// in a process forked after threads were started (libgomp's pool does not survive a fork), or with
// PYFAST_CPU_PARALLEL=pool, a persistent pool of parked std::threads runs them instead; see
// parallel_cpu.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

// Hot CPU loops are compiled for AVX-512 (x86-64-v4), AVX2 and the baseline x86-64 ISA; the loader
// picks the best one for the running CPU (GCC function multiversioning), so one build runs
// everywhere. The AVX-512 clone's 32 vector registers (and mask registers for the selects) are what
// the box loss's ~40 live values per box need: 6-30% faster than AVX2 per mode on a Zen 4 VM.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PYFAST_SIMD_CLONES
#endif

namespace pyfast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls range(ctx, begin, end) over a partition of [0, num_blocks) into contiguous ranges, one per
// thread of a team of at most `num_threads` (the calling thread included); returns when all are done.
// An exception thrown by a range is rethrown here (the first one).
using BlockRangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void run_block_ranges(int64_t num_blocks, int num_threads, void* ctx, BlockRangeFn range);

// "openmp: <library path>" or "pool": what runs the blocks of the next parallel call.
std::string cpu_parallel_backend();

// Runs fn(block_index) for block_index in [0, num_blocks) on up to `num_threads` threads.
// `min_blocks_per_thread` keeps tiny problems on the calling thread, where waking a worker
// costs more than the work.
template <class Fn>
void parallel_blocks(int64_t num_blocks, int num_threads, int64_t min_blocks_per_thread, Fn&& fn) {
  if (num_blocks <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, num_blocks / std::max<int64_t>(1, min_blocks_per_thread));
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, by_work)));
  if (threads == 1) {
    for (int64_t b = 0; b < num_blocks; ++b) fn(b);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  run_block_ranges(num_blocks, threads, const_cast<void*>(static_cast<const void*>(&fn)),
                   [](void* ctx, int64_t begin, int64_t end) {
                     F& f = *static_cast<F*>(ctx);
                     for (int64_t b = begin; b < end; ++b) f(b);
                   });
}

}  // namespace pyfast
