// CUDA kernels of the fused mask loss.
//
// Forward, three launches, no atomics, no host sync: (1) blocks over (mask, chunk) work items
// sum the per-element terms with 16-byte loads and write one partial per item; (2) one thread
// per mask adds its partials in chunk order and computes the mask's loss; (3) one block adds the
// mask losses in a fixed order. Backward: per-mask coefficients, then one elementwise pass.
// mask_iou reuses (1) and (2).
#include "mask_loss/mask_loss.h"

#include "common/cuda_utils.cuh"
#include "mask_loss/mask_loss_math.h"

namespace pyfast {
namespace {

// Elements per forward work item: enough per block to hide latency, small enough that a few
// large masks still spread over every SM.
constexpr int64_t kChunk = 8192;

int64_t chunks_per_row(int64_t m) { return m > 0 ? (m + kChunk - 1) / kChunk : 1; }

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

template <int K, bool VECTOR, class T, class TT, class Elem, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    row_partials_kernel(Elem elem, int64_t n, int64_t m, int64_t cpr, const T* __restrict__ logits,
                        const TT* __restrict__ targets, A* __restrict__ partial) {
  constexpr int VEC = vec_width<T>();
  const int64_t items = n * cpr;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / cpr, c = item % cpr;
    const int64_t begin = row * m + c * kChunk;
    const int64_t end = row * m + (m < (c + 1) * kChunk ? m : (c + 1) * kChunk);
    A acc[K];
    for (int k = 0; k < K; ++k) acc[k] = A(0);
    if (VECTOR) {
      // begin and end are multiples of VEC (m and kChunk are).
      const auto* lv = reinterpret_cast<const Vec<T, VEC>*>(logits);
      const auto* tv = reinterpret_cast<const Vec<TT, VEC>*>(targets);
      for (int64_t v = begin / VEC + threadIdx.x; v < end / VEC; v += blockDim.x) {
        const Vec<T, VEC> x = lv[v];
        const Vec<TT, VEC> t = tv[v];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A s[K];
          elem(to_acc<A>(x.v[j]), mask::load_target<A>(t.v[j]), s);
          for (int k = 0; k < K; ++k) acc[k] += s[k];
        }
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        A s[K];
        elem(to_acc<A>(logits[i]), mask::load_target<A>(targets[i]), s);
        for (int k = 0; k < K; ++k) acc[k] += s[k];
      }
    }
    for (int k = 0; k < K; ++k) {
      const A total = block_sum(acc[k]);
      if (threadIdx.x == 0) partial[item * K + k] = total;
    }
  }
}

// Adds each mask's partials in chunk order into sums (n x K).
template <int K, class A> __device__ __forceinline__ void gather_row(const A* partial, int64_t row, int64_t cpr, A* s) {
  for (int k = 0; k < K; ++k) s[k] = A(0);
  for (int64_t c = 0; c < cpr; ++c) {
    for (int k = 0; k < K; ++k) s[k] += partial[(row * cpr + c) * K + k];
  }
}

template <class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    loss_rows_kernel(mask::RowMath<A> rm, int64_t n, int64_t cpr, const A* __restrict__ partial,
                     A* __restrict__ sums, A* __restrict__ row_loss) {
  for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < n; row += (int64_t)gridDim.x * blockDim.x) {
    A s[mask::kNumSums];
    gather_row<mask::kNumSums>(partial, row, cpr, s);
    for (int k = 0; k < mask::kNumSums; ++k) sums[row * mask::kNumSums + k] = s[k];
    row_loss[row] = rm.template loss<A>(s);
  }
}

template <class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    iou_rows_kernel(int64_t n, int64_t cpr, const A* __restrict__ partial, A* __restrict__ iou) {
  for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < n; row += (int64_t)gridDim.x * blockDim.x) {
    A s[mask::kNumIoUSums];
    gather_row<mask::kNumIoUSums>(partial, row, cpr, s);
    iou[row] = mask::iou_from_sums<A>(s);
  }
}

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
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out.v[j] = from_acc<T>(mask::element_grad(loss, c, to_acc<A>(x.v[j]), mask::load_target<A>(t.v[j])));
      }
      gv[v] = out;
    }
  } else {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += stride) {
      grad[i] = from_acc<T>(
          mask::element_grad(loss, coef[i / m], to_acc<A>(logits[i]), mask::load_target<A>(targets[i])));
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

template <int K, class T, class TT, class Elem, class A>
void launch_partials(const Elem& elem, int64_t n, int64_t m, const T* logits, const TT* targets, A* partial,
                     cudaStream_t stream) {
  const int64_t cpr = chunks_per_row(m);
  const int64_t items = n * cpr;
  const int blocks = static_cast<int>(items < kMaxBlocks ? items : kMaxBlocks);
  if (can_vectorize<T, TT>(m, logits, targets)) {
    row_partials_kernel<K, true><<<blocks, kThreadsPerBlock, 0, stream>>>(elem, n, m, cpr, logits, targets, partial);
  } else {
    row_partials_kernel<K, false><<<blocks, kThreadsPerBlock, 0, stream>>>(elem, n, m, cpr, logits, targets, partial);
  }
  check_launch("mask_loss row sums");
}

int64_t acc_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

}  // namespace

int64_t mask_loss_forward_cuda_workspace(const MaskLossForward& args) {
  // The partials, then one loss per mask.
  return (args.n * chunks_per_row(args.m) * mask::kNumSums + args.n) * acc_size(args.dtype);
}

int64_t mask_loss_backward_cuda_workspace(const MaskLossBackward& args) {
  // RowCoef (4 values) per mask.
  return args.n * 4 * acc_size(args.dtype);
}

int64_t mask_iou_cuda_workspace(const MaskIoU& args) {
  return args.n * chunks_per_row(args.m) * mask::kNumIoUSums * acc_size(args.dtype);
}

void mask_loss_forward_cuda(const MaskLossForward& args, const CudaLaunch& launch) {
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  const bool reduce = args.reduction != Reduction::None;
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    A* partial = launch.workspace.as<A>();
    const int64_t cpr = chunks_per_row(args.m);
    A* row_loss = reduce ? partial + args.n * cpr * mask::kNumSums : args.out.as<A>();
    if (args.n > 0 && args.m > 0) {
      mask::dispatch_focal<A>(args.options, [&](const auto& loss) {
        launch_partials<mask::kNumSums>(ForwardElem<std::decay_t<decltype(loss)>>{loss}, args.n, args.m,
                                        args.logits.as<const T>(), args.targets.as<const TT>(), partial, stream);
      });
      loss_rows_kernel<A><<<grid_for(args.n), kThreadsPerBlock, 0, stream>>>(
          mask::row_math<A>(args.options, args.m), args.n, cpr, partial, args.sums.as<A>(), row_loss);
      check_launch("mask_loss per-mask loss");
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
    mask::dispatch_focal<A>(args.options, [&](const auto& loss) {
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
    A* partial = launch.workspace.as<A>();
    launch_partials<mask::kNumIoUSums>(IoUElem<A>{A(args.threshold)}, args.n, args.m, args.logits.as<const T>(),
                                       args.targets.as<const TT>(), partial, stream);
    iou_rows_kernel<A><<<grid_for(args.n), kThreadsPerBlock, 0, stream>>>(args.n, chunks_per_row(args.m), partial,
                                                                         args.iou.as<A>());
    check_launch("mask_iou per-mask result");
  });
}

}  // namespace pyfast
