// What runs parallel_blocks' ranges: torch's OpenMP runtime when the process has one loaded, else
// a persistent pool of parked threads (see parallel.h for why).
//
// OpenMP: torch's CPU kernels run in OpenMP parallel regions whose workers spin for a while after
// each region before they sleep. Threads of our own started next to them would compete with those
// spinning workers for the cores right after every torch op; a region of the same runtime instead
// hands our ranges to those very workers. The runtime is found by symbol in the running process
// (torch has loaded it before any kernel here runs), never linked: pyfast._C builds without torch
// and without OpenMP.
//
// Fork: an OpenMP runtime's thread pool does not survive fork() (libgomp's child hangs in its next
// parallel region), and neither would ours. A forked child therefore never enters the runtime and
// starts a fresh pool of its own on its first parallel call.
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYFAST_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define PYFAST_CPU_RELAX() asm volatile("yield")
#else
#define PYFAST_CPU_RELAX() ((void)0)
#endif

namespace pyfast {
namespace {

// One call's work: the ranges and the first exception a range threw.
struct Job {
  int64_t num_blocks;
  void* ctx;
  BlockRangeFn range;
  std::mutex error_mutex;
  std::exception_ptr error;

  // Runs share `t` of a team of `team`: blocks [num_blocks * t / team, num_blocks * (t + 1) / team).
  void run_share(int t, int team) {
    const int64_t begin = num_blocks * t / team, end = num_blocks * (t + 1) / team;
    if (begin >= end) return;
    try {
      range(ctx, begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
};

// ---- the OpenMP runtime torch loaded ----

// GCC's OpenMP ABI (libgomp >= 4.9; also exported by LLVM's libomp and Intel's libiomp5).
using GompParallelFn = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
using OmpIntFn = int (*)();

struct OpenMP {
  GompParallelFn parallel = nullptr;
  OmpIntFn thread_num = nullptr;
  OmpIntFn num_threads = nullptr;
  std::string library;
  bool found() const { return parallel && thread_num && num_threads; }
};

OpenMP symbols_of(void* handle) {
  OpenMP omp;
  omp.parallel = reinterpret_cast<GompParallelFn>(dlsym(handle, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<OmpIntFn>(dlsym(handle, "omp_get_thread_num"));
  omp.num_threads = reinterpret_cast<OmpIntFn>(dlsym(handle, "omp_get_num_threads"));
  Dl_info info;
  if (omp.parallel && dladdr(reinterpret_cast<void*>(omp.parallel), &info) && info.dli_fname) {
    omp.library = info.dli_fname;
  }
  return omp;
}

// The names of loaded objects that look like an OpenMP runtime, for when torch's was loaded with
// RTLD_LOCAL (its symbols then are not in the global scope).
int collect_openmp_libraries(dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (name && *name) {
    const char* base = std::strrchr(name, '/');
    base = base ? base + 1 : name;
    if (!std::strncmp(base, "libgomp", 7) || !std::strncmp(base, "libomp", 6) || !std::strncmp(base, "libiomp", 7)) {
      static_cast<std::vector<std::string>*>(data)->push_back(name);
    }
  }
  return 0;
}

OpenMP find_openmp() {
  OpenMP omp = symbols_of(RTLD_DEFAULT);
  if (omp.found()) return omp;
  std::vector<std::string> names;
  dl_iterate_phdr(collect_openmp_libraries, &names);
  for (const std::string& name : names) {
    // RTLD_NOLOAD: only a library that is already there (it stays loaded: we hold a reference).
    void* handle = dlopen(name.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) continue;
    omp = symbols_of(handle);
    if (omp.found()) return omp;
    dlclose(handle);
  }
  return OpenMP{};
}

struct OpenMPCall {
  Job* job;
  const OpenMP* omp;
};

void openmp_region_body(void* data) {
  auto* call = static_cast<OpenMPCall*>(data);
  // The team can be smaller than asked (nested regions, thread limits): deal by its real size.
  call->job->run_share(call->omp->thread_num(), call->omp->num_threads());
}

// ---- the persistent pool ----

// Workers park on a condition variable between calls, after a short spin that keeps calls in
// quick succession (a forward and its backward) from paying a wake-up each. One call at a time
// uses the pool; a call from a second thread meanwhile runs its blocks on its own thread.
class Pool {
 public:
  // False when another call is using the pool.
  bool try_run(Job& job, int team) {
    std::unique_lock<std::mutex> call(call_mutex_, std::try_to_lock);
    if (!call.owns_lock()) return false;
    while (num_workers_ < team - 1) start_worker(num_workers_++);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      team_ = team;
      pending_.store(team - 1, std::memory_order_relaxed);
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    }
    wake_.notify_all();
    job.run_share(0, team);
    for (int spin = 0; spin < kSpins && pending_.load(std::memory_order_acquire) != 0; ++spin) PYFAST_CPU_RELAX();
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    return true;
  }

 private:
  static constexpr int kSpins = 4000;  // a few tens of microseconds

  void start_worker(int index) {
    std::thread worker([this, index] { work(index); });
    pthread_setname_np(worker.native_handle(), "pyfast-cpu");
    worker.detach();  // the pool lives as long as the process (or is abandoned by a fork)
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load(std::memory_order_acquire) == seen; ++spin) PYFAST_CPU_RELAX();
      Job* job;
      int team;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
        team = team_;
      }
      if (index + 1 >= team) continue;  // not in this call's team
      job->run_share(index + 1, team);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  std::mutex call_mutex_;  // held for a whole call
  std::mutex mutex_;       // guards job_, team_ and the waits
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  Job* job_ = nullptr;
  int team_ = 0;
  int num_workers_ = 0;  // guarded by call_mutex_
};

// ---- choosing ----

enum class Backend { kUnresolved, kOpenMP, kPool };

std::atomic<Pool*> g_pool{nullptr};
std::atomic<bool> g_forked{false};
OpenMP g_openmp;  // written once, before g_backend is published
std::atomic<Backend> g_backend{Backend::kUnresolved};
std::mutex g_resolve_mutex;

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  // No lock (a lock held by another thread at fork() would be held forever in the child): racing
  // creators keep the first pool. Pools are never destroyed; their threads end with the process.
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;
  return *p;
}

// PYFAST_CPU_PARALLEL: auto (default: torch's OpenMP runtime when loaded, else the pool) or pool.
Backend resolve_backend() {
  Backend backend = g_backend.load(std::memory_order_acquire);
  if (backend != Backend::kUnresolved) return backend;
  std::lock_guard<std::mutex> lock(g_resolve_mutex);
  backend = g_backend.load(std::memory_order_relaxed);
  if (backend != Backend::kUnresolved) return backend;
  const char* env = std::getenv("PYFAST_CPU_PARALLEL");
  const std::string setting = env && *env ? env : "auto";
  if (setting != "auto" && setting != "pool") {
    throw std::invalid_argument("PYFAST_CPU_PARALLEL must be auto or pool, got '" + setting + "'");
  }
  if (setting == "auto") g_openmp = find_openmp();
  backend = g_openmp.found() ? Backend::kOpenMP : Backend::kPool;
  g_backend.store(backend, std::memory_order_release);
  return backend;
}

void after_fork_in_child() {
  g_forked.store(true);
  g_pool.store(nullptr);  // the parent's workers do not exist here: abandon that pool
  new (&g_resolve_mutex) std::mutex();  // possibly held by a parent thread at fork()
}

const bool g_atfork_registered = pthread_atfork(nullptr, nullptr, after_fork_in_child) == 0;

}  // namespace

void run_block_ranges(int64_t num_blocks, int num_threads, void* ctx, BlockRangeFn range) {
  Job job{num_blocks, ctx, range, {}, nullptr};
  const int team = num_threads < 1 ? 1 : num_threads;
  if (team == 1) {
    job.run_share(0, 1);
  } else if (resolve_backend() == Backend::kOpenMP && !g_forked.load(std::memory_order_relaxed)) {
    OpenMPCall call{&job, &g_openmp};
    g_openmp.parallel(openmp_region_body, &call, static_cast<unsigned>(team), 0);
  } else if (!pool().try_run(job, team)) {
    job.run_share(0, 1);
  }
  if (job.error) std::rethrow_exception(job.error);
}

std::string cpu_parallel_backend() {
  (void)g_atfork_registered;
  if (resolve_backend() == Backend::kOpenMP && !g_forked.load()) return "openmp: " + g_openmp.library;
  return "pool";
}

}  // namespace pyfast
