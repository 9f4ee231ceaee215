// Launch helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/op_args.h"

namespace pyfast {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pyfast: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// Makes the tensors' device current for one entry point and restores the caller's afterwards:
// the launch must not depend on which device the calling thread happens to have selected.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
    } else {
      previous_ = -1;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline cudaStream_t stream_of(const CudaLaunch& launch) { return reinterpret_cast<cudaStream_t>(launch.stream); }

// Launch errors (bad configuration, no device image for this GPU) surface as Python exceptions.
// cudaGetLastError does not synchronize.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pyfast: CUDA launch of ") + what + " failed: " + cudaGetErrorString(err));
  }
}

constexpr int kThreadsPerBlock = 256;
// Enough resident blocks to fill any current GPU with grid-stride loops, fixed so that no
// device-property query is needed per call.
constexpr int kMaxBlocks = 1024;

inline int grid_for(long long n, int per_thread = 1) {
  const long long blocks = (n + (long long)kThreadsPerBlock * per_thread - 1) / ((long long)kThreadsPerBlock * per_thread);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <class A> __device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of kThreadsPerBlock threads; the result is valid in thread 0.
template <class A> __device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_partials[kThreadsPerBlock / 32];
  __syncthreads();  // safe to call repeatedly in one kernel
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreadsPerBlock / 32 ? warp_partials[threadIdx.x] : A(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace pyfast
