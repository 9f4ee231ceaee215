// CUDA kernels of the fused box loss. Forward: grid-stride over boxes with 16-byte loads
// (one float32 box), per-block partial sums, and a one-block second pass that adds the partials
// in a fixed order (deterministic, no atomics). Backward: one elementwise pass.
#include "box_loss/box_loss.h"

#include <stdexcept>

#include "box_loss/box_loss_math.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"

namespace pyfast {
namespace {

// One box as a single aligned vector load: 16 bytes for float, 8 for half/bfloat16, 2x16 for double.
template <class T> struct alignas(4 * sizeof(T)) BoxVec {
  T v[4];
};

template <class A, class T> __device__ __forceinline__ void load_box_vec(const T* base, int64_t i, A* dst) {
  const BoxVec<T> b = reinterpret_cast<const BoxVec<T>*>(base)[i];
  for (int k = 0; k < 4; ++k) dst[k] = to_acc<A>(b.v[k]);
}

template <class T, class A> __device__ __forceinline__ void store_box_vec(T* base, int64_t i, const A* src) {
  BoxVec<T> b;
  for (int k = 0; k < 4; ++k) b.v[k] = from_acc<T>(src[k]);
  reinterpret_cast<BoxVec<T>*>(base)[i] = b;
}

template <class T, class Loss, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(Loss loss, int64_t n, const T* __restrict__ pred, const T* __restrict__ target,
                   box::Weight weight_kind, const A* __restrict__ weight, A* __restrict__ out, int output, bool reduce,
                   A* __restrict__ partial) {
  A acc = A(0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    A p[4], t[4];
    load_box_vec(pred, i, p);
    load_box_vec(target, i, t);
    if (output == box::kVariant) {
      out[i] = loss.variant(p, t);
      continue;
    }
    A value;
    if (weight_kind == box::kPerCoordinate) {
      A w[4];
      for (int k = 0; k < 4; ++k) w[k] = weight[4 * i + k];
      value = loss.forward_weighted(p, t, w);
    } else {
      value = loss.forward(p, t);
      if (weight_kind == box::kPerBox) value *= weight[i];
    }
    if (reduce) {
      acc += value;
    } else {
      out[i] = value;
    }
  }
  if (reduce) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

template <class A> __global__ void __launch_bounds__(kThreadsPerBlock)
    sum_partials_kernel(const A* __restrict__ partial, int num_partials, A scale, A* __restrict__ out) {
  A acc = A(0);
  for (int i = threadIdx.x; i < num_partials; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] = acc * scale;
}

template <class T, class Loss, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(Loss loss, int64_t n, const A* __restrict__ grad_out, bool grad_is_scalar, A scale,
                    const T* __restrict__ pred, const T* __restrict__ target, box::Weight weight_kind,
                    const A* __restrict__ weight, T* __restrict__ grad_pred, T* __restrict__ grad_target,
                    A* __restrict__ grad_weight) {
  const A g_scalar = grad_is_scalar ? grad_out[0] * scale : A(0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    A p[4], t[4], gp[4], gt[4];
    load_box_vec(pred, i, p);
    load_box_vec(target, i, t);
    const A g = grad_is_scalar ? g_scalar : grad_out[i] * scale;
    if (weight_kind == box::kPerCoordinate) {
      A w[4];
      for (int k = 0; k < 4; ++k) w[k] = weight[4 * i + k];
      if (grad_weight) loss.weight_grad(p, t, g, grad_weight + 4 * i);
      loss.backward_weighted(p, t, g, w, gp, gt);
    } else {
      if (grad_weight) grad_weight[i] = g * loss.forward(p, t);
      loss.backward(p, t, weight_kind == box::kPerBox ? g * weight[i] : g, gp, gt);
    }
    store_box_vec(grad_pred, i, gp);
    if (grad_target) store_box_vec(grad_target, i, gt);
  }
}

}  // namespace

int64_t box_loss_forward_cuda_workspace(const BoxLossForward& args) {
  const int64_t elem = args.dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return args.reduction != Reduction::None ? grid_for(args.n) * elem : 0;
}

void box_loss_forward_cuda(const BoxLossForward& args, const CudaLaunch& launch) {
  if (args.grad_pred || args.grad_target) {
    throw std::invalid_argument("pyfast: box_loss_forward writes gradients on the CPU only");
  }
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  const bool reduce = args.reduction != Reduction::None;
  dispatch_float(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int blocks = grid_for(args.n);
    A* partial = launch.workspace.as<A>();
    if (args.n > 0) {
      box::dispatch_box_loss<A>(args.options, [&](const auto& loss) {
        // Always with the scaling step: ordinary boxes get s = 1 (the same bits) and the ALU work is free here.
        forward_kernel<T><<<blocks, kThreadsPerBlock, 0, stream>>>(
            loss.scaled(), args.n, args.pred.as<const T>(), args.target.as<const T>(), args.weight_kind,
            args.weight.as<const A>(), args.out.as<A>(), args.output, reduce, partial);
      });
      check_launch("box_loss forward");
    }
    if (reduce) {
      // With n == 0 there are no partials: the second pass writes 0 (times scale).
      sum_partials_kernel<A><<<1, kThreadsPerBlock, 0, stream>>>(
          partial, args.n > 0 ? blocks : 0, A(reduction_scale(args.reduction, args.n, args.avg_factor)),
          args.out.as<A>());
      check_launch("box_loss reduction");
    }
  });
}

void box_loss_backward_cuda(const BoxLossBackward& args, const CudaLaunch& launch) {
  if (args.n == 0) return;
  DeviceGuard device(launch.device);
  const cudaStream_t stream = stream_of(launch);
  dispatch_float(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    box::dispatch_box_loss<A>(args.options, [&](const auto& loss) {
      backward_kernel<T><<<grid_for(args.n), kThreadsPerBlock, 0, stream>>>(
          loss.scaled(), args.n, args.grad_out.as<const A>(), args.reduction != Reduction::None,
          A(reduction_scale(args.reduction, args.n, args.avg_factor)), args.pred.as<const T>(),
          args.target.as<const T>(), args.weight_kind, args.weight.as<const A>(), args.grad_pred.as<T>(),
          args.grad_target.as<T>(), args.grad_weight.as<A>());
    });
    check_launch("box_loss backward");
  });
}

}  // namespace pyfast
