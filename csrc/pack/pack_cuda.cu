// CUDA kernel of pyfast.pack.
//
// Work is one flat space of tiles over all items: an item of n elements is ceil(n / kTile) tiles
// (a small item is one short tile), and blocks stride over the tiles in order, so one large tensor
// among thousands of small ones spreads over every SM and no block idles on an empty grid row.
// Inside a tile each thread moves kUnroll groups of 8 elements with 16-byte loads and one 16-byte
// store per group, 64 bytes of source loads in flight per thread before the first store of each
// batch (4 groups of 16-bit, 2 of float32, 1 of float64 sources); the few elements before the
// first 16-byte boundary of the output and after the last full group go element by element. An item
// whose source and output cannot both be 16-byte aligned at the same element (a view starting at an
// odd offset, say) goes element by element throughout.
//
// The item descriptors travel as kernel parameters, in chunks of up to kLargeSlots items per
// launch: nothing is copied to the device per call, so the launch is safe to capture in a CUDA
// graph (a pinned upload captured in a graph would replay from a host buffer long since reused).
//
// Each tile reduces its counts and max and adds them to the item's totals with integer atomics (the
// max of non-negative doubles is the max of their bit patterns): the results do not depend on the
// block schedule. No host sync happens here.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "pack/pack.h"
#include "pack/pack_convert.h"

namespace pyfast {
namespace {

constexpr int kGroup = 8;  // elements per 16-byte store of 16-bit output
constexpr int kUnroll = 4;  // groups in flight per thread
constexpr int64_t kTile = (int64_t)kThreadsPerBlock * kGroup * kUnroll;  // 8192 elements
// At most 64 registers a thread, so that 2048 threads fit an SM: the loads in flight are what
// hides memory latency here.
constexpr int kMinBlocksPerSM = 4;

// One item as the kernel sees it (32 bytes).
struct PackSlot {
  int64_t src;         // address of the first source element
  int64_t out;         // element offset of the item in the output buffer
  int64_t numel;
  int32_t first_tile;  // index of the item's first tile within its chunk
  int16_t dtype;       // DType code of the source
  int8_t head;         // vector items: elements before the first 16-byte boundary of the output
  int8_t vector;       // 1: source and output are 16-byte aligned at element `head`
};
static_assert(sizeof(PackSlot) == 32, "PackSlot is 32 bytes");

// Up to kSlots items: a few dozen fit the classic 4 KB parameter space (the common call, a
// handful of feature maps); many small items go kLargeSlots to a launch (32 KB parameters, sm_70+
// with CUDA 12.1+, which this module's runtime already requires).
constexpr int kSmallSlots = 120;
constexpr int kLargeSlots = 1000;
template <int kSlots> struct PackChunk {
  int64_t base_item;  // index of slots[0] among all items (rows of counts and absmax)
  int32_t count;
  int32_t total_tiles;
  PackSlot slots[kSlots];
};
static_assert(sizeof(PackChunk<kSmallSlots>) <= 4096, "the small chunk fits the classic parameter space");
static_assert(sizeof(PackChunk<kLargeSlots>) <= 32764, "the large chunk fits the sm_70+ parameter space");

// Tiles of an item: tile 0 is [0, head + kTile), tile j > 0 is [head + j kTile, head + (j+1) kTile),
// both cut at numel; so every tile after the first starts on a 16-byte boundary of the output.
int64_t tiles_of(int64_t numel, int head) {
  if (numel == 0) return 0;
  return numel <= head ? 1 : (numel - head + kTile - 1) / kTile;
}

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

// Component c (0..3) of a 16-byte word; with c known at compile time this is a register move
// (indexing the words through a pointer instead would put them in local memory).
__device__ __forceinline__ uint32_t component(const uint4& w, int c) { return c == 0 ? w.x : c == 1 ? w.y : c == 2 ? w.z : w.w; }

// 8 source elements as raw 16-byte words (2 for float, 4 for double, 1 for 16-bit).
template <class S> struct Group {
  static constexpr int kWords = kGroup * static_cast<int>(sizeof(S)) / 16;
  uint4 words[kWords];
  __device__ __forceinline__ S at(int j) const {
    if constexpr (sizeof(S) == 4) {
      return __uint_as_float(component(words[j / 4], j % 4));
    } else if constexpr (sizeof(S) == 8) {
      const uint4& w = words[j / 2];
      return j % 2 == 0 ? __hiloint2double(w.y, w.x) : __hiloint2double(w.w, w.z);
    } else {
      return S{static_cast<uint16_t>(component(words[0], j / 2) >> (16 * (j % 2)))};
    }
  }
};

// Not inlined: with all four source types inlined into the kernel's switch the register allocator
// spills; as calls (one per tile of 8192 elements) each type fits in 64 registers.
template <class S, class D, bool kSaturate>
__device__ __noinline__ void pack_tile(const PackSlot& slot, int64_t tile, uint16_t* __restrict__ dst, unsigned long long* counts,
                          double* absmax) {
  const S* __restrict__ src = reinterpret_cast<const S*>(slot.src);
  uint16_t* __restrict__ out = dst + slot.out;
  const int64_t head = slot.head;
  const int64_t start = tile == 0 ? 0 : head + tile * kTile;
  const int64_t end = head + (tile + 1) * kTile < slot.numel ? head + (tile + 1) * kTile : slot.numel;
  unsigned int nonfinite = 0, overflow = 0;  // at most kTile per thread
  typename pack::Source<S>::Bits amax = 0;
  auto one = [&](int64_t i) { out[i] = pack::convert<S, D, kSaturate>(src[i], nonfinite, overflow, amax); };
  if (slot.vector) {
    const int64_t vs = tile == 0 ? (head < end ? head : end) : start;  // first vector element
    const int64_t groups = (end - vs) / kGroup;
    const int64_t ve = vs + groups * kGroup;
    // Scalar edges: before vs (tile 0 only, < 8 elements) and after the last full group (< 8).
    for (int64_t i = start + threadIdx.x; i < vs; i += blockDim.x) one(i);
    for (int64_t i = ve + threadIdx.x; i < end; i += blockDim.x) one(i);
    const auto* sv = reinterpret_cast<const Group<S>*>(src + vs);
    auto* ov = reinterpret_cast<uint4*>(out + vs);
    // Groups tid, tid + 256, ... in batches of kInFlight: 64 source bytes of loads in flight per
    // thread before the batch's first store, whatever the source type.
    constexpr int kInFlight = 64 / (kGroup * static_cast<int>(sizeof(S))) > 0 ? 64 / (kGroup * static_cast<int>(sizeof(S))) : 1;
#pragma unroll 1  // unrolled, the compiler hoists every batch's loads and runs out of registers
    for (int batch = 0; batch < kUnroll; batch += kInFlight) {
      Group<S> in[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t g = threadIdx.x + (batch + u) * (int64_t)kThreadsPerBlock;
        if (g < groups) {
#pragma unroll
          for (int w = 0; w < Group<S>::kWords; ++w) in[u].words[w] = __ldg(&sv[g].words[w]);
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t g = threadIdx.x + (batch + u) * (int64_t)kThreadsPerBlock;
        if (g < groups) {
          uint32_t pairs[kGroup / 2];
#pragma unroll
          for (int j = 0; j < kGroup; j += 2) {
            const uint32_t lo = pack::convert<S, D, kSaturate>(in[u].at(j), nonfinite, overflow, amax);
            const uint32_t hi = pack::convert<S, D, kSaturate>(in[u].at(j + 1), nonfinite, overflow, amax);
            pairs[j / 2] = lo | (hi << 16);
          }
          ov[g] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
        }
      }
    }
  } else {
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) one(i);
  }
  const unsigned long long total_nonfinite = block_sum((unsigned long long)nonfinite);
  const unsigned long long total_overflow = block_sum((unsigned long long)overflow);
  const double m = block_max(pack::Source<S>::abs_value(amax));
  if (threadIdx.x == 0) {
    if (total_nonfinite) atomicAdd(counts, total_nonfinite);
    if (total_overflow) atomicAdd(counts + 1, total_overflow);
    if (m > 0.0) atomicMax(reinterpret_cast<unsigned long long*>(absmax), __double_as_longlong(m));
  }
}

template <class D, bool kSaturate, int kSlots>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSM)
    pack_kernel(const __grid_constant__ PackChunk<kSlots> chunk, uint16_t* __restrict__ dst,
                unsigned long long* __restrict__ counts, double* __restrict__ absmax) {
  for (int64_t tile = blockIdx.x; tile < chunk.total_tiles; tile += gridDim.x) {
    // The slot holding this tile: the last with first_tile <= tile (items without elements have
    // no tiles and are never found). Uniform across the block: a broadcast read of the parameters.
    int lo = 0, hi = chunk.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (chunk.slots[mid].first_tile <= tile) lo = mid;
      else hi = mid - 1;
    }
    const PackSlot& slot = chunk.slots[lo];
    const int64_t item = chunk.base_item + lo;
    const int64_t local = tile - slot.first_tile;
    switch (static_cast<DType>(slot.dtype)) {
      case DType::Float32: pack_tile<float, D, kSaturate>(slot, local, dst, counts + 2 * item, absmax + item); break;
      case DType::Float64: pack_tile<double, D, kSaturate>(slot, local, dst, counts + 2 * item, absmax + item); break;
      case DType::Float16: pack_tile<Half, D, kSaturate>(slot, local, dst, counts + 2 * item, absmax + item); break;
      case DType::BFloat16: pack_tile<BFloat16, D, kSaturate>(slot, local, dst, counts + 2 * item, absmax + item); break;
      case DType::UInt8: break;  // not a pack source (checked in Python)
    }
  }
}

int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::UInt8: break;
  }
  throw std::invalid_argument("pyfast: pack source dtype code " + std::to_string(static_cast<int>(dtype)) +
                              " is not a float type");
}

PackSlot slot_for(const PackItem& item, uintptr_t dst) {
  const DType dtype = static_cast<DType>(item.dtype);
  const int64_t size = element_size(dtype);
  const uintptr_t out_address = dst + static_cast<uintptr_t>(item.offset) * 2;
  const int head = static_cast<int>((16 - out_address % 16) % 16 / 2);
  const bool vector = out_address % 2 == 0 && item.numel >= head + kGroup &&
                      (static_cast<uintptr_t>(item.src) + head * size) % 16 == 0;
  return PackSlot{item.src, item.offset, item.numel, 0, static_cast<int16_t>(item.dtype),
                  static_cast<int8_t>(vector ? head : 0), static_cast<int8_t>(vector ? 1 : 0)};
}

template <int kSlots>
void launch_chunk(const PackChunk<kSlots>& chunk, DType out_dtype, bool saturate, uint16_t* dst,
                  unsigned long long* counts, double* absmax, cudaStream_t stream) {
  if (chunk.total_tiles == 0) return;
  const int blocks = chunk.total_tiles < kMaxBlocks ? chunk.total_tiles : kMaxBlocks;
  if (out_dtype == DType::Float16) {
    if (saturate) pack_kernel<Half, true, kSlots><<<blocks, kThreadsPerBlock, 0, stream>>>(chunk, dst, counts, absmax);
    else pack_kernel<Half, false, kSlots><<<blocks, kThreadsPerBlock, 0, stream>>>(chunk, dst, counts, absmax);
  } else {
    if (saturate) pack_kernel<BFloat16, true, kSlots><<<blocks, kThreadsPerBlock, 0, stream>>>(chunk, dst, counts, absmax);
    else pack_kernel<BFloat16, false, kSlots><<<blocks, kThreadsPerBlock, 0, stream>>>(chunk, dst, counts, absmax);
  }
  check_launch("pack");
}

// Fills chunks of kSlots items from items[first, num_items) and launches each.
template <int kSlots>
void launch_chunks(const PackItem* items, int64_t first, int64_t num_items, const PackArgs& args, cudaStream_t stream) {
  auto* dst = args.dst.as<uint16_t>();
  auto* counts = args.counts.as<unsigned long long>();
  auto* absmax = args.absmax.as<double>();
  PackChunk<kSlots> chunk;
  int64_t next = first;
  while (next < num_items) {
    chunk.base_item = next;
    chunk.count = 0;
    int64_t tiles = 0;
    while (next < num_items && chunk.count < kSlots) {
      PackSlot slot = slot_for(items[next], args.dst.raw);
      const int64_t item_tiles = tiles_of(slot.numel, slot.head);
      if (item_tiles > INT32_MAX - tiles) {
        if (chunk.count > 0) break;  // the item starts the next chunk
        throw std::invalid_argument("pyfast: pack item " + std::to_string(next) + " has more than 2^31 tiles");
      }
      slot.first_tile = static_cast<int32_t>(tiles);
      tiles += item_tiles;
      chunk.slots[chunk.count++] = slot;
      ++next;
    }
    chunk.total_tiles = static_cast<int32_t>(tiles);
    launch_chunk(chunk, args.out_dtype, args.saturate, dst, counts, absmax, stream);
  }
}

}  // namespace

void pack_cuda(const PackArgs& args, const CudaLaunch& launch) {
  if (args.num_items == 0) return;
  if (args.out_dtype != DType::Float16 && args.out_dtype != DType::BFloat16) {
    throw std::invalid_argument("pyfast: pack output dtype must be float16 or bfloat16");
  }
  DeviceGuard device(launch.device);
  const PackItem* items = args.items.as<const PackItem>();  // host memory
  if (args.num_items <= kSmallSlots) {
    launch_chunks<kSmallSlots>(items, 0, args.num_items, args, stream_of(launch));
  } else {
    launch_chunks<kLargeSlots>(items, 0, args.num_items, args, stream_of(launch));
  }
}

}  // namespace pyfast
