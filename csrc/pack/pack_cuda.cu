// CUDA kernel of pyfast.pack: one launch for all items. blockIdx.y picks the item (striding when
// there are more items than grid rows), blockIdx.x grid-strides over its elements. Each block
// reduces its counts and max and adds them to the item's totals with integer atomics (the max
// of non-negative doubles is the max of their bit patterns), so the result does not depend on
// the block schedule. No host sync happens here.
//
// Loads and stores are per element (coalesced 2-8 byte accesses): items start at arbitrary
// element offsets in the packed buffer, so 16-byte vector stores would need a peeled prologue
// per item.
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "pack/pack.h"
#include "pack/pack_convert.h"

namespace pyfast {
namespace {

constexpr int kMaxGridY = 65535;
// Keeps the total block count bounded when there are many items.
constexpr long long kMaxTotalBlocks = 8192;

__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long v) { return block_sum(v); }

__device__ __forceinline__ double block_max(double v) {
  __shared__ double warp_partials[kThreadsPerBlock / 32];
  __syncthreads();
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreadsPerBlock / 32 ? warp_partials[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <class S, class D, bool kSaturate>
__device__ void pack_item(const PackItem& item, uint16_t* __restrict__ dst, unsigned long long* __restrict__ counts,
                          double* __restrict__ absmax, int64_t item_index) {
  const S* __restrict__ src = reinterpret_cast<const S*>(item.src);
  uint16_t* __restrict__ out = dst + item.offset;
  unsigned long long nonfinite = 0, overflow = 0;
  typename pack::Source<S>::Bits amax = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < item.numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = pack::convert<S, D, kSaturate>(src[i], nonfinite, overflow, amax);
  }
  nonfinite = block_sum_u64(nonfinite);
  overflow = block_sum_u64(overflow);
  const double m = block_max(pack::Source<S>::abs_value(amax));
  if (threadIdx.x == 0) {
    if (nonfinite) atomicAdd(counts + 2 * item_index, nonfinite);
    if (overflow) atomicAdd(counts + 2 * item_index + 1, overflow);
    if (m > 0.0) atomicMax(reinterpret_cast<unsigned long long*>(absmax + item_index), __double_as_longlong(m));
  }
}

template <class D, bool kSaturate>
__global__ void __launch_bounds__(kThreadsPerBlock)
    pack_kernel(const PackItem* __restrict__ items, int64_t num_items, uint16_t* __restrict__ dst,
                unsigned long long* __restrict__ counts, double* __restrict__ absmax) {
  for (int64_t it = blockIdx.y; it < num_items; it += gridDim.y) {
    const PackItem item = items[it];
    // The branch is uniform across the block: every thread reads the same item.
    switch (static_cast<DType>(item.dtype)) {
      case DType::Float32: pack_item<float, D, kSaturate>(item, dst, counts, absmax, it); break;
      case DType::Float64: pack_item<double, D, kSaturate>(item, dst, counts, absmax, it); break;
      case DType::Float16: pack_item<Half, D, kSaturate>(item, dst, counts, absmax, it); break;
      case DType::BFloat16: pack_item<BFloat16, D, kSaturate>(item, dst, counts, absmax, it); break;
      case DType::UInt8: break;  // not a pack source (checked in Python)
    }
  }
}

}  // namespace

void pack_cuda(const PackArgs& args, const CudaLaunch& launch) {
  if (args.num_items == 0 || args.max_numel == 0) return;
  const DType out_code = args.out_dtype;
  if (out_code != DType::Float16 && out_code != DType::BFloat16) {
    throw std::invalid_argument("pyfast: pack output dtype must be float16 or bfloat16");
  }
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  const PackItem* items = args.items.as<const PackItem>();
  const int64_t num_items = args.num_items, max_numel = args.max_numel;
  const bool saturate = args.saturate;
  double* absmax = args.absmax.as<double>();
  const int grid_y = static_cast<int>(num_items < kMaxGridY ? num_items : kMaxGridY);
  long long grid_x = grid_for(max_numel);
  if (grid_x * grid_y > kMaxTotalBlocks) grid_x = kMaxTotalBlocks / grid_y > 1 ? kMaxTotalBlocks / grid_y : 1;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  auto* out = args.dst.as<uint16_t>();
  auto* cnt = args.counts.as<unsigned long long>();
  if (out_code == DType::Float16) {
    if (saturate) pack_kernel<Half, true><<<grid, kThreadsPerBlock, 0, stream>>>(items, num_items, out, cnt, absmax);
    else pack_kernel<Half, false><<<grid, kThreadsPerBlock, 0, stream>>>(items, num_items, out, cnt, absmax);
  } else {
    if (saturate) pack_kernel<BFloat16, true><<<grid, kThreadsPerBlock, 0, stream>>>(items, num_items, out, cnt, absmax);
    else pack_kernel<BFloat16, false><<<grid, kThreadsPerBlock, 0, stream>>>(items, num_items, out, cnt, absmax);
  }
  check_launch("pack");
}

}  // namespace pyfast
