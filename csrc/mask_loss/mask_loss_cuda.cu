// CUDA kernels of the fused mask loss.
//
// Forward, no atomics, no host sync, every sum in a fixed order (the result does not depend on
// the block schedule):
// - masks of up to kWarpMask elements: one warp per mask, eight masks to a block; the warp adds
//   its mask's terms, reduces them with shuffles and computes the mask's loss itself (one launch);
// - larger masks: blocks over (mask, chunk) work items write one partial per item, then one warp
//   per mask adds its partials (lanes over chunks in order, then a shuffle tree) and computes the
//   loss: a 4096 x 4096 mask's 2048 partials take 64 adds per lane, not 2048 on one thread.
// With a reduction, one block then adds the mask losses in a fixed order.
// Backward: per-mask coefficients, then one elementwise pass. mask_iou reuses the forward's
// reductions. 16-bit logits use the fast element math of mask_loss_fast_math.cuh.
#include "mask_loss/mask_loss.h"

#include <stdexcept>

#include "common/cuda_utils.cuh"
#include "mask_loss/mask_loss_fast_math.cuh"
#include "mask_loss/mask_loss_math.h"

namespace pyfast {
namespace {

constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
// Masks up to this size go one warp each (at most 128 elements per lane).
constexpr int64_t kWarpMask = 4096;
// Elements per block work item of a larger mask: enough per block to hide latency, small enough
// that a few large masks still spread over every SM.
constexpr int64_t kChunk = 8192;

// The path depends on the mask size only, so a mask's result does not depend on its batch.
bool warp_per_mask(int64_t m) { return m <= kWarpMask; }
int64_t chunks_per_row(int64_t m) { return m > 0 ? (m + kChunk - 1) / kChunk : 1; }
int warp_grid(int64_t n) {
  const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// VEC elements of E in one aligned load: 16 bytes of logits (4 float, 8 half, 2 double).
template <class E, int VEC> struct alignas(sizeof(E) * VEC) Vec {
  E v[VEC];
};
template <class T> constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

// Vector loads need every mask to start on a VEC boundary and both base pointers aligned.
template <class T, class TT> bool can_vectorize(int64_t m, const void* logits, const void* targets) {
  constexpr int VEC = vec_width<T>();
  return m % VEC == 0 && reinterpret_cast<uintptr_t>(logits) % sizeof(Vec<T, VEC>) == 0 &&
         reinterpret_cast<uintptr_t>(targets) % sizeof(Vec<TT, VEC>) == 0;
}

// Adds the terms of elements [begin, end) to acc, `lane` of `lanes` threads striding over them.
// With VECTOR, begin and end are multiples of VEC.
template <int K, bool VECTOR, class A, class T, class TT, class Elem>
__device__ __forceinline__ void add_terms(const Elem& elem, int64_t begin, int64_t end, int lane, int lanes,
                                          const T* __restrict__ logits, const TT* __restrict__ targets, A* acc) {
  constexpr int VEC = vec_width<T>();
  if (VECTOR) {
    const auto* lv = reinterpret_cast<const Vec<T, VEC>*>(logits);
    const auto* tv = reinterpret_cast<const Vec<TT, VEC>*>(targets);
#pragma unroll 2
    for (int64_t v = begin / VEC + lane; v < end / VEC; v += lanes) {
      const Vec<T, VEC> x = lv[v];
      const Vec<TT, VEC> t = tv[v];
      A xa[VEC];
      mask_fast::to_acc_n<A, T, VEC>(x.v, xa);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        A s[K];
        elem(xa[j], mask::load_target<A>(t.v[j]), s);
#pragma unroll
        for (int k = 0; k < K; ++k) acc[k] += s[k];
      }
    }
  } else {
    for (int64_t i = begin + lane; i < end; i += lanes) {
      A s[K];
      elem(to_acc<A>(logits[i]), mask::load_target<A>(targets[i]), s);
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] += s[k];
    }
  }
}

// K sums over the block, in a fixed order; valid in thread 0.
template <int K, class A> __device__ __forceinline__ void block_sums(A* acc) {
  __shared__ A warp_partials[K][kWarpsPerBlock];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = warp_sum(acc[k]);
  __syncthreads();  // the previous item's reads of warp_partials are done
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_partials[k][warp] = acc[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = warp_sum(lane < kWarpsPerBlock ? warp_partials[k][lane] : A(0));
  }
}

// Small masks: warp w of the grid takes masks w, w + warps, ...; lane 0 hands the mask's K sums
// to `finish`.
template <int K, bool VECTOR, class T, class TT, class Elem, class Finish, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    warp_rows_kernel(Elem elem, Finish finish, int64_t n, int64_t m, const T* __restrict__ logits,
                     const TT* __restrict__ targets, A /*type tag*/) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
  for (int64_t row = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5); row < n; row += warps) {
    A acc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = A(0);
    add_terms<K, VECTOR>(elem, row * m, row * m + m, lane, 32, logits, targets, acc);
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = warp_sum(acc[k]);
    if (lane == 0) finish(row, acc);
  }
}

// Larger masks: one partial per (mask, chunk) work item.
template <int K, bool VECTOR, class T, class TT, class Elem, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    row_partials_kernel(Elem elem, int64_t n, int64_t m, int64_t cpr, const T* __restrict__ logits,
                        const TT* __restrict__ targets, A* __restrict__ partial) {
  const int64_t items = n * cpr;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / cpr, c = item % cpr;
    const int64_t begin = row * m + c * kChunk;
    const int64_t end = row * m + (m < (c + 1) * kChunk ? m : (c + 1) * kChunk);
    A acc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = A(0);
    add_terms<K, VECTOR>(elem, begin, end, threadIdx.x, blockDim.x, logits, targets, acc);
    block_sums<K>(acc);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) partial[item * K + k] = acc[k];
    }
  }
}

// One warp per mask adds its cpr partials: lane l takes chunks l, l + 32, ... in order, then a
// shuffle tree; lane 0 hands the sums to `finish`.
template <int K, class Finish, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    finish_rows_kernel(Finish finish, int64_t n, int64_t cpr, const A* __restrict__ partial) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
  for (int64_t row = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5); row < n; row += warps) {
    A acc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = A(0);
    for (int64_t c = lane; c < cpr; c += 32) {
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] += partial[(row * cpr + c) * K + k];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = warp_sum(acc[k]);
    if (lane == 0) finish(row, acc);
  }
}

// What happens to a mask's sums: the loss (and the sums saved for the backward), or the IoU.
template <class A> struct LossFinish {
  mask::RowMath<A> rm;
  A* sums;
  A* row_loss;
  __device__ __forceinline__ void operator()(int64_t row, const A* s) const {
#pragma unroll
    for (int k = 0; k < mask::kNumSums; ++k) sums[row * mask::kNumSums + k] = s[k];
    row_loss[row] = rm.template loss<A>(s);
  }
};
template <class A> struct IoUFinish {
  A* iou;
  __device__ __forceinline__ void operator()(int64_t row, const A* s) const { iou[row] = mask::iou_from_sums<A>(s); }
};

// One block: out[0] = scale * sum(values), in a fixed order.
template <class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    sum_kernel(const A* __restrict__ values, int64_t n, A scale, A* __restrict__ out) {
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += values[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc * scale;
}

template <class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    coef_kernel(mask::RowMath<A> rm, int64_t n, const A* __restrict__ grad_out, bool grad_is_scalar, A scale,
                const A* __restrict__ sums, mask::RowCoef<A>* __restrict__ coef) {
  for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < n; row += (int64_t)gridDim.x * blockDim.x) {
    const A g = (grad_is_scalar ? grad_out[0] : grad_out[row]) * scale;
    coef[row] = mask::row_coef(rm, sums + row * mask::kNumSums, g);
  }
}

template <bool VECTOR, class T, class TT, class Loss, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(Loss loss, int64_t total, int64_t m, const mask::RowCoef<A>* __restrict__ coef,
                    const T* __restrict__ logits, const TT* __restrict__ targets, T* __restrict__ grad) {
  constexpr int VEC = vec_width<T>();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (VECTOR) {
    // m % VEC == 0: a vector never straddles two masks.
    const auto* lv = reinterpret_cast<const Vec<T, VEC>*>(logits);
    const auto* tv = reinterpret_cast<const Vec<TT, VEC>*>(targets);
    auto* gv = reinterpret_cast<Vec<T, VEC>*>(grad);
    for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < total / VEC; v += stride) {
      const mask::RowCoef<A> c = coef[v * VEC / m];
      const Vec<T, VEC> x = lv[v];
      const Vec<TT, VEC> t = tv[v];
      A xa[VEC], ga[VEC];
      mask_fast::to_acc_n<A, T, VEC>(x.v, xa);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ga[j] = loss.grad(c, xa[j], mask::load_target<A>(t.v[j]));
      Vec<T, VEC> out;
      mask_fast::from_acc_n<T, A, VEC>(ga, out.v);
      gv[v] = out;
    }
  } else {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += stride) {
      grad[i] = from_acc<T>(loss.grad(coef[i / m], to_acc<A>(logits[i]), mask::load_target<A>(targets[i])));
    }
  }
}

template <class Loss> struct ForwardElem {
  Loss loss;
  template <class A> __device__ __forceinline__ void operator()(A x, A t, A* s) const { loss.forward(x, t, s); }
};
template <class A> struct IoUElem {
  A threshold;
  __device__ __forceinline__ void operator()(A x, A t, A* s) const { mask::iou_element(x, t, threshold, s); }
};

// The K per-mask sums of `elem` over every mask, handed to `finish` (see the top of the file).
template <int K, class T, class TT, class Elem, class Finish, class A>
void launch_rows(const Elem& elem, const Finish& finish, int64_t n, int64_t m, const T* logits, const TT* targets,
                 A* partial, cudaStream_t stream) {
  const bool vector = can_vectorize<T, TT>(m, logits, targets);
  if (warp_per_mask(m)) {
    if (vector) {
      warp_rows_kernel<K, true><<<warp_grid(n), kThreadsPerBlock, 0, stream>>>(elem, finish, n, m, logits, targets, A(0));
    } else {
      warp_rows_kernel<K, false><<<warp_grid(n), kThreadsPerBlock, 0, stream>>>(elem, finish, n, m, logits, targets, A(0));
    }
    check_launch("mask_loss per-mask sums");
    return;
  }
  const int64_t cpr = chunks_per_row(m);
  const int64_t items = n * cpr;
  const int blocks = static_cast<int>(items < kMaxBlocks ? items : kMaxBlocks);
  if (vector) {
    row_partials_kernel<K, true><<<blocks, kThreadsPerBlock, 0, stream>>>(elem, n, m, cpr, logits, targets, partial);
  } else {
    row_partials_kernel<K, false><<<blocks, kThreadsPerBlock, 0, stream>>>(elem, n, m, cpr, logits, targets, partial);
  }
  check_launch("mask_loss partial sums");
  finish_rows_kernel<K><<<warp_grid(n), kThreadsPerBlock, 0, stream>>>(finish, n, cpr, partial);
  check_launch("mask_loss per-mask sums");
}

int64_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

// Accumulator values of the (mask, chunk) partials: none when each mask is one warp's.
int64_t partial_count(int64_t n, int64_t m, int k) { return warp_per_mask(m) ? 0 : n * chunks_per_row(m) * k; }

}  // namespace

int64_t mask_loss_forward_cuda_workspace(const MaskLossForward& args) {
  // The partials, then one loss per mask.
  return (partial_count(args.n, args.m, mask::kNumSums) + args.n) * acc_size(args.dtype);
}

int64_t mask_loss_backward_cuda_workspace(const MaskLossBackward& args) {
  // RowCoef (4 values) per mask.
  return args.n * 4 * acc_size(args.dtype);
}

int64_t mask_iou_cuda_workspace(const MaskIoU& args) {
  return partial_count(args.n, args.m, mask::kNumIoUSums) * acc_size(args.dtype);
}

void mask_loss_forward_cuda(const MaskLossForward& args, const CudaLaunch& launch) {
  if (args.grad_logits) throw std::invalid_argument("pyfast: mask_loss_forward writes gradients on the CPU only");
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  const bool reduce = args.reduction != Reduction::None;
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    A* partial = launch.workspace.as<A>();
    A* row_loss = reduce ? partial + partial_count(args.n, args.m, mask::kNumSums) : args.out.as<A>();
    if (args.n > 0 && args.m > 0) {
      const LossFinish<A> finish{mask::row_math<A>(args.options, args.m), args.sums.as<A>(), row_loss};
      mask_fast::dispatch_loss<T, A>(args.options, [&](const auto& loss) {
        launch_rows<mask::kNumSums>(ForwardElem<std::decay_t<decltype(loss)>>{loss}, finish, args.n, args.m,
                                    args.logits.as<const T>(), args.targets.as<const TT>(), partial, stream);
      });
    }
    if (reduce) {
      // With n == 0 this writes 0 (times scale).
      sum_kernel<A><<<1, kThreadsPerBlock, 0, stream>>>(
          row_loss, args.n, A(reduction_scale(args.reduction, args.n, args.avg_factor)), args.out.as<A>());
      check_launch("mask_loss reduction");
    }
  });
}

void mask_loss_backward_cuda(const MaskLossBackward& args, const CudaLaunch& launch) {
  if (args.n == 0 || args.m == 0) return;
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    auto* coef = launch.workspace.as<mask::RowCoef<A>>();
    coef_kernel<A><<<grid_for(args.n), kThreadsPerBlock, 0, stream>>>(
        mask::row_math<A>(args.options, args.m), args.n, args.grad_out.as<const A>(),
        args.reduction != Reduction::None, A(reduction_scale(args.reduction, args.n, args.avg_factor)),
        args.sums.as<const A>(), coef);
    check_launch("mask_loss backward coefficients");
    const int64_t total = args.n * args.m;
    const auto* x = args.logits.as<const T>();
    const auto* t = args.targets.as<const TT>();
    auto* g = args.grad_logits.as<T>();
    const bool vector = can_vectorize<T, TT>(args.m, x, t) &&
                        reinterpret_cast<uintptr_t>(g) % sizeof(Vec<T, vec_width<T>()>) == 0;
    mask_fast::dispatch_loss<T, A>(args.options, [&](const auto& loss) {
      if (vector) {
        backward_kernel<true><<<grid_for(total, vec_width<T>()), kThreadsPerBlock, 0, stream>>>(loss, total, args.m,
                                                                                                coef, x, t, g);
      } else {
        backward_kernel<false><<<grid_for(total), kThreadsPerBlock, 0, stream>>>(loss, total, args.m, coef, x, t, g);
      }
    });
    check_launch("mask_loss backward");
  });
}

void mask_iou_cuda(const MaskIoU& args, const CudaLaunch& launch) {
  if (args.n == 0 || args.m == 0) return;
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    launch_rows<mask::kNumIoUSums>(IoUElem<A>{A(args.threshold)}, IoUFinish<A>{args.iou.as<A>()}, args.n, args.m,
                                   args.logits.as<const T>(), args.targets.as<const TT>(), launch.workspace.as<A>(),
                                   stream);
  });
}

}  // namespace pyfast
