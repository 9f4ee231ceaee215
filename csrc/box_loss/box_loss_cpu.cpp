// CPU kernels of the fused box loss: one pass over the boxes for the forward (loss and reduction
// together), one for the backward (recomputing from the inputs, nothing saved per box).
#include "box_loss/box_loss.h"

#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#define PYFAST_STREAM_STORES 1
#endif

#include "box_loss/box_loss_math.h"
#include "common/dispatch.h"
#include "common/parallel.h"

namespace pyfast {
namespace {

constexpr int64_t kBoxesPerBlock = 2048;
// Below ~16k boxes a second thread costs more to start than it saves.
constexpr int64_t kMinBlocksPerThread = 8;

// |x| as bits (non-negative IEEE numbers order like their bit patterns), and the bits of
// box::PairScale's threshold 2^kMaxExp: an integer max that rides along in the vectorized loops.
inline uint32_t abs_bits(float x) { return float_to_bits(x) & 0x7FFFFFFFu; }
inline uint64_t abs_bits(double x) { return double_to_bits(x) & 0x7FFFFFFFFFFFFFFFull; }
inline bool reaches_scale_threshold(uint32_t bits) { return bits >= uint32_t(127 + box::PairScale::kMaxExpFloat) << 23; }
inline bool reaches_scale_threshold(uint64_t bits) {
  return bits >= uint64_t(1023 + box::PairScale::kMaxExpDouble) << 52;
}
template <class A> inline auto pair_bits(const A* p, const A* t) {
  auto m = abs_bits(p[0]);
  for (int k = 1; k < 4; ++k) m = m > abs_bits(p[k]) ? m : abs_bits(p[k]);
  for (int k = 0; k < 4; ++k) m = m > abs_bits(t[k]) ? m : abs_bits(t[k]);
  return m;
}

// A chunk of boxes as four columns (one per coordinate). The per-box loops read and write these
// instead of the interleaved boxes: converting between the two layouts inside the backward's loop
// body, among the IoU math's ~40 live values, made GCC spill and store element by element (~430
// instructions per 8 boxes); in separate loops it is a few permutes per vector.
constexpr int64_t kColumnChunk = 256;
template <class A> struct BoxColumns {
  A c[4][kColumnChunk];
};
template <class T, class A>
PYFAST_HD void to_columns(const T* __restrict__ boxes, int64_t count, BoxColumns<A>& out) {
  for (int64_t j = 0; j < count; ++j) {
    for (int k = 0; k < 4; ++k) out.c[k][j] = to_acc<A>(boxes[4 * j + k]);
  }
}
template <class T, class A>
PYFAST_HD void from_columns(const BoxColumns<A>& in, int64_t count, T* __restrict__ boxes) {
  for (int64_t j = 0; j < count; ++j) {
    for (int k = 0; k < 4; ++k) boxes[4 * j + k] = from_acc<T>(in.c[k][j]);
  }
}

// The hardware prefetchers stop at each 4 KB page, and a chunk of boxes is about a page, so every
// chunk began by waiting on memory for its first loads. The chunk loops prefetch the next chunk's
// boxes (and gradients) in kPrefetchBoxes steps spread over the current chunk's math. Addresses
// are computed as integers: the next chunk may lie past the array, which a prefetch never faults on.
constexpr int64_t kPrefetchBoxes = 64;
template <class T> inline void prefetch_boxes(const T* boxes, int64_t first_box, bool write) {
  constexpr int64_t kLine = 64, kBytes = kPrefetchBoxes * 4 * int64_t(sizeof(T));
  const uintptr_t start = reinterpret_cast<uintptr_t>(boxes) + uintptr_t(first_box * 4 * int64_t(sizeof(T)));
  for (int64_t b = 0; b < kBytes; b += kLine) {
    const void* line = reinterpret_cast<const void*>(start + uintptr_t(b));
    if (write) {
      __builtin_prefetch(line, 1, 3);
    } else {
      __builtin_prefetch(line, 0, 3);
    }
  }
}

// The chunk loop of the per-box kernels below: each chunk of boxes into columns, the next chunk
// prefetched (with up to two outputs of four values per box, `written0/1`, null for none or for
// outputs written with streaming stores, which need no lines in the cache) while
// per_box(begin, j, p, t) runs for box begin + j, then chunk_done(begin, n). Returns whether a pair
// needed the PairScale step (a coordinate at or beyond its threshold, inf and NaN included).
// Inlined into each SIMD clone of its callers, where the per-box loop vectorizes.
template <class A, class T, class PerBox, class ChunkDone>
PYFAST_HD bool for_each_box(int64_t count, const T* __restrict__ pred, const T* __restrict__ target,
                            const T* written0, const T* written1, PerBox&& per_box, ChunkDone&& chunk_done) {
  decltype(abs_bits(A{})) largest = 0;
  BoxColumns<A> pc, tc;
  for (int64_t begin = 0; begin < count; begin += kColumnChunk) {
    const int64_t n = std::min(kColumnChunk, count - begin);
    to_columns(pred + 4 * begin, n, pc);
    to_columns(target + 4 * begin, n, tc);
    for (int64_t j0 = 0; j0 < n; j0 += kPrefetchBoxes) {
      const int64_t next = begin + kColumnChunk + j0;
      prefetch_boxes(pred, next, false);
      prefetch_boxes(target, next, false);
      if (written0) prefetch_boxes(written0, next, true);
      if (written1) prefetch_boxes(written1, next, true);
      const int64_t j_end = std::min(n, j0 + kPrefetchBoxes);
      for (int64_t j = j0; j < j_end; ++j) {
        const A p[4] = {pc.c[0][j], pc.c[1][j], pc.c[2][j], pc.c[3][j]};
        const A t[4] = {tc.c[0][j], tc.c[1][j], tc.c[2][j], tc.c[3][j]};
        const auto bits = pair_bits(p, t);
        largest = largest > bits ? largest : bits;
        per_box(begin, j, p, t);
      }
    }
    chunk_done(begin, n);
  }
  return reaches_scale_threshold(largest);
}

// Gradients of at least this many bytes are written with streaming (non-temporal) stores. A
// gradient this large does not stay in the caches until it is read anyway (the pass also streams
// twice as many input bytes through them), and an ordinary store first reads each line it writes:
// a quarter of the pass's memory traffic. At 1M float32 boxes (16 MB of gradient) that made the
// forward with the gradient ~10% faster here; at 256k-512k boxes it gained nothing in the pass and
// made reading the gradient afterwards slower (it is then in DRAM rather than in L3).
constexpr int64_t kStreamGradientBytes = int64_t(16) << 20;

// from_columns for a full chunk of float or double boxes, through a row buffer in L1 and 16-byte
// streaming stores. Returns false (nothing written) where it does not apply: another type, a
// partial chunk, a destination not 16-byte aligned, or a compiler without SSE2 intrinsics.
template <class T, class A> inline bool stream_columns(const BoxColumns<A>& in, int64_t count, T* boxes) {
#ifdef PYFAST_STREAM_STORES
  if constexpr (std::is_same<T, A>::value && (std::is_same<T, float>::value || std::is_same<T, double>::value)) {
    if (count != kColumnChunk || reinterpret_cast<uintptr_t>(boxes) % 16 != 0) return false;
    alignas(16) T rows[4 * kColumnChunk];
    from_columns(in, count, rows);
    constexpr int kPerStore = 16 / sizeof(T);
    for (int64_t i = 0; i < 4 * kColumnChunk; i += kPerStore) {
      if constexpr (std::is_same<T, float>::value) {
        _mm_stream_ps(boxes + i, _mm_load_ps(rows + i));
      } else {
        _mm_stream_pd(boxes + i, _mm_load_pd(rows + i));
      }
    }
    return true;
  }
#endif
  (void)in, (void)count, (void)boxes;
  return false;
}

// The chunk's gradients into `boxes`: streamed where asked and stream_columns applies, else
// from_columns.
template <class T, class A> inline void store_columns(const BoxColumns<A>& in, int64_t count, T* boxes, bool stream) {
  if (!stream || !stream_columns(in, count, boxes)) from_columns(in, count, boxes);
}

// Makes a block's streaming stores visible to other threads before it ends (they bypass the
// caches' ordering).
inline void fence_streaming_stores() {
#ifdef PYFAST_STREAM_STORES
  _mm_sfence();
#endif
}

// The per-box loops below are branch-free maps over one block so that the compiler vectorizes
// them. They run the loss without the PairScale step and return whether a pair needed it; the
// caller then redoes that block with the scaled loss. Only what changes the per-box math is a
// template parameter (the output kind here, whether grad_target is written below): weights and the
// gradient's scale are applied in separate passes over the block, which cost nothing next to the
// IoU math and keep the number of instantiations (each compiled three times: AVX-512, AVX2 and the
// baseline) small.
template <bool VARIANT, class T, class Loss, class A>
PYFAST_SIMD_CLONES bool map_block(const Loss& loss, int64_t count, const T* __restrict__ pred,
                                  const T* __restrict__ target, A* __restrict__ out) {
  return for_each_box<A>(
      count, pred, target, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
      [&](int64_t begin, int64_t j, const A* p, const A* t) PYFAST_ELEM_LAMBDA {
        out[begin + j] = VARIANT ? loss.variant(p, t) : loss.forward(p, t);
      },
      [](int64_t, int64_t) {});
}

// Elements of `weight` per box.
inline int64_t weight_stride(box::Weight kind) { return kind == box::kPerCoordinate ? 4 : 1; }

// Any output and weight kind, box by box: the blocks that need the scaling step (rare, so plain).
template <class T, class Loss, class A>
void map_block_generic(const Loss& loss, int64_t count, const T* pred, const T* target, box::Output output,
                       box::Weight weight_kind, const A* weight, A* out) {
  for (int64_t j = 0; j < count; ++j) {
    A p[4], t[4];
    box::load_box(pred + 4 * j, p);
    box::load_box(target + 4 * j, t);
    A value;
    if (output == box::kVariant) {
      value = loss.variant(p, t);
    } else if (weight_kind == box::kPerCoordinate) {
      value = loss.forward_weighted(p, t, weight + 4 * j);
    } else {
      value = loss.forward(p, t);
      if (weight_kind == box::kPerBox) value *= weight[j];
    }
    out[j] = value;
  }
}

// Sum in kLanes independent accumulators (vectorizable without reassociating), then in double.
template <class A> double sum_block(const A* values, int64_t count) {
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += values[j + l];
  }
  double total = 0.0;
  for (; j < count; ++j) total += static_cast<double>(values[j]);
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

// Returns whether a pair needed the PairScale step, as map_block. g[j]: box j's gradient scale.
// VALUES: also writes each box's (unweighted) loss to values[j], as map_block would: the forward's
// math shares most of its terms with the backward's, which the compiler computes once. stream:
// write the gradients with streaming stores where stream_columns applies.
template <bool TARGET_GRAD, bool VALUES, class T, class Loss, class A>
PYFAST_SIMD_CLONES bool backward_block(const Loss& loss, int64_t count, const A* __restrict__ g,
                                       const T* __restrict__ pred, const T* __restrict__ target,
                                       T* __restrict__ grad_pred, T* __restrict__ grad_target,
                                       A* __restrict__ values, bool stream) {
  BoxColumns<A> gpc, gtc;
  return for_each_box<A>(
      count, pred, target, stream ? nullptr : grad_pred, TARGET_GRAD && !stream ? grad_target : nullptr,
      [&](int64_t begin, int64_t j, const A* p, const A* t) PYFAST_ELEM_LAMBDA {
        if (VALUES) values[begin + j] = loss.forward(p, t);
        A gp[4], gt[4];
        loss.backward(p, t, g[begin + j], gp, gt);
        for (int k = 0; k < 4; ++k) gpc.c[k][j] = gp[k];
        if (TARGET_GRAD) {
          for (int k = 0; k < 4; ++k) gtc.c[k][j] = gt[k];
        }
      },
      [&](int64_t begin, int64_t n) PYFAST_ELEM_LAMBDA {
        store_columns(gpc, n, grad_pred + 4 * begin, stream);
        if (TARGET_GRAD) store_columns(gtc, n, grad_target + 4 * begin, stream);
      });
}

// The backward for any weight kind, box by box: per-coordinate weights (mmdet-style inputs, not
// the hot path) and the blocks that need the scaling step.
template <class T, class Loss, class A>
void backward_block_generic(const Loss& loss, int64_t count, const A* grad_out, bool grad_is_scalar, A g_scalar,
                            A scale, const T* pred, const T* target, box::Weight weight_kind, const A* weight,
                            T* grad_pred, T* grad_target, A* grad_weight) {
  for (int64_t j = 0; j < count; ++j) {
    A p[4], t[4], gp[4], gt[4];
    box::load_box(pred + 4 * j, p);
    box::load_box(target + 4 * j, t);
    const A g = grad_is_scalar ? g_scalar : grad_out[j] * scale;
    if (weight_kind == box::kPerCoordinate) {
      if (grad_weight) loss.weight_grad(p, t, g, grad_weight + 4 * j);
      loss.backward_weighted(p, t, g, weight + 4 * j, gp, gt);
    } else {
      if (grad_weight) grad_weight[j] = g * loss.forward(p, t);
      loss.backward(p, t, weight_kind == box::kPerBox ? g * weight[j] : g, gp, gt);
    }
    for (int k = 0; k < 4; ++k) grad_pred[4 * j + k] = from_acc<T>(gp[k]);
    if (grad_target) {
      for (int k = 0; k < 4; ++k) grad_target[4 * j + k] = from_acc<T>(gt[k]);
    }
  }
}

// Where one block's backward reads its gradient scale and writes its gradients.
template <class T, class A> struct GradPlan {
  const A* grad_out;    // one value (grad_is_scalar) or one per box
  bool grad_is_scalar;
  A g_scalar;           // grad_out[0] * scale, when grad_is_scalar
  A scale;              // the reduction's
  box::Weight weight_kind;
  const A* weight;
  T* grad_pred;
  T* grad_target;       // may be null, as grad_weight
  A* grad_weight;
  bool stream;          // write grad_pred and grad_target with streaming stores (kStreamGradientBytes)
};

// Whether a pass over n boxes writes its gradients with streaming stores (kStreamGradientBytes).
template <class T> bool stream_gradients(int64_t n, bool target_grad) {
  return n * 4 * int64_t(sizeof(T)) * (target_grad ? 2 : 1) >= kStreamGradientBytes;
}

// The backward of boxes [begin, begin + count). values, where not null (no per-coordinate weight):
// each box's unweighted loss, from the same pass.
template <class T, class Loss, class A>
void backward_range(const Loss& loss, const GradPlan<T, A>& plan, const T* pred, const T* target, int64_t begin,
                    int64_t count, A* values = nullptr) {
  const int64_t stride = weight_stride(plan.weight_kind);
  const T* p = pred + 4 * begin;
  const T* t = target + 4 * begin;
  const A* g = plan.grad_is_scalar ? plan.grad_out : plan.grad_out + begin;
  const A* w = plan.weight ? plan.weight + begin * stride : nullptr;
  T* gp = plan.grad_pred + 4 * begin;
  T* gt = plan.grad_target ? plan.grad_target + 4 * begin : nullptr;
  A* gw = plan.grad_weight ? plan.grad_weight + begin * stride : nullptr;
  if (plan.weight_kind == box::kPerCoordinate) {
    // A plain loop: mmdet-style inputs, not the hot path, so the scaling step always runs.
    backward_block_generic(loss.scaled(), count, g, plan.grad_is_scalar, plan.g_scalar, plan.scale, p, t,
                           plan.weight_kind, w, gp, gt, gw);
    return;
  }
  if (gw) {
    // d loss / d weight_i = g_i * unweighted loss_i
    for (int64_t j = 0; j < count; ++j) {
      A pb[4], tb[4];
      box::load_box(p + 4 * j, pb);
      box::load_box(t + 4 * j, tb);
      gw[j] = (plan.grad_is_scalar ? plan.g_scalar : g[j] * plan.scale) * loss.forward(pb, tb);
    }
  }
  // Each box's gradient scale, as backward_block_generic computes it.
  A scales[kBoxesPerBlock];
  if (plan.grad_is_scalar) {
    for (int64_t j = 0; j < count; ++j) scales[j] = plan.g_scalar;
  } else {
    for (int64_t j = 0; j < count; ++j) scales[j] = g[j] * plan.scale;
  }
  if (w) {
    for (int64_t j = 0; j < count; ++j) scales[j] *= w[j];
  }
  const bool stream = plan.stream;
  bool needs_scale;
  if (values) {
    needs_scale = gt ? backward_block<true, true>(loss, count, scales, p, t, gp, gt, values, stream)
                     : backward_block<false, true>(loss, count, scales, p, t, gp, gt, values, stream);
  } else {
    needs_scale = gt ? backward_block<true, false>(loss, count, scales, p, t, gp, gt, values, stream)
                     : backward_block<false, false>(loss, count, scales, p, t, gp, gt, values, stream);
  }
  if (stream) fence_streaming_stores();
  // Ordinary pairs get the same bits either way: the whole block is simply done again.
  if (needs_scale) {
    if (values) map_block_generic(loss.scaled(), count, p, t, box::kLoss, box::kNoWeight, w, values);
    backward_block_generic(loss.scaled(), count, g, plan.grad_is_scalar, plan.g_scalar, plan.scale, p, t,
                           plan.weight_kind, w, gp, gt, gw);
  }
}

template <class T, class Loss, class A = typename Acc<T>::type>
void backward_impl(const Loss& loss, const BoxLossBackward& args, int num_threads) {
  const A* grad_out = args.grad_out.as<const A>();
  const bool grad_is_scalar = args.reduction != Reduction::None;
  const A scale = A(reduction_scale(args.reduction, args.n, args.avg_factor));
  const GradPlan<T, A> plan{grad_out,
                            grad_is_scalar,
                            grad_is_scalar ? grad_out[0] * scale : A(0),
                            scale,
                            args.weight_kind,
                            args.weight.as<const A>(),
                            args.grad_pred.as<T>(),
                            args.grad_target.as<T>(),
                            args.grad_weight.as<A>(),
                            stream_gradients<T>(args.n, bool(args.grad_target))};
  const T* pred = args.pred.as<const T>();
  const T* target = args.target.as<const T>();
  parallel_blocks(ceil_div(args.n, kBoxesPerBlock), num_threads, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kBoxesPerBlock;
    backward_range(loss, plan, pred, target, begin, std::min(args.n, begin + kBoxesPerBlock) - begin);
  });
}

template <class T, class Loss, class A = typename Acc<T>::type>
void forward_impl(const Loss& loss, const BoxLossForward& args, int num_threads) {
  const int64_t n = args.n;
  const T* pred = args.pred.as<const T>();
  const T* target = args.target.as<const T>();
  const A* weight = args.weight.as<const A>();
  A* out = args.out.as<A>();
  const bool reduce = args.reduction != Reduction::None;
  const A scale = A(reduction_scale(args.reduction, n, args.avg_factor));
  // The gradient for grad_out = 1, where asked for: the backward's plan with g = 1 * scale.
  const GradPlan<T, A> grad_plan{nullptr, true, scale, scale, args.weight_kind, weight, args.grad_pred.as<T>(),
                                 args.grad_target.as<T>(), nullptr,
                                 stream_gradients<T>(n, bool(args.grad_target))};
  const int64_t num_blocks = ceil_div(n, kBoxesPerBlock);
  // Per-block partial sums in double, added in block order: the result does not depend on the
  // thread count.
  std::vector<double> partial(reduce ? num_blocks : 0, 0.0);
  parallel_blocks(num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kBoxesPerBlock, count = std::min(n, begin + kBoxesPerBlock) - begin;
    const T* p = pred + 4 * begin;
    const T* t = target + 4 * begin;
    const A* w = weight ? weight + begin * weight_stride(args.weight_kind) : nullptr;
    A scratch[kBoxesPerBlock];
    A* dst = reduce ? scratch : out + begin;
    if (grad_plan.grad_pred && args.weight_kind != box::kPerCoordinate) {
      // The loss and its gradient in one pass over the block.
      backward_range(loss, grad_plan, pred, target, begin, count, dst);
      if (args.weight_kind == box::kPerBox) {
        for (int64_t j = 0; j < count; ++j) dst[j] *= w[j];
      }
    } else if (args.output == box::kLoss && args.weight_kind == box::kPerCoordinate) {
      // mmdet-style inputs, not the hot path: box by box, the scaling step always on.
      map_block_generic(loss.scaled(), count, p, t, args.output, args.weight_kind, w, dst);
    } else {
      const bool needs_scale = args.output == box::kVariant ? map_block<true>(loss, count, p, t, dst)
                                                            : map_block<false>(loss, count, p, t, dst);
      if (needs_scale) {
        // Ordinary pairs get the same bits either way: the whole block is simply done again.
        map_block_generic(loss.scaled(), count, p, t, args.output, args.weight_kind, w, dst);
      } else if (args.output == box::kLoss && args.weight_kind == box::kPerBox) {
        for (int64_t j = 0; j < count; ++j) dst[j] *= w[j];
      }
    }
    if (reduce) partial[b] = sum_block(scratch, count);
    if (grad_plan.grad_pred && args.weight_kind == box::kPerCoordinate) {
      backward_range(loss, grad_plan, pred, target, begin, count);
    }
  });
  if (reduce) {
    double total = 0.0;
    for (double v : partial) total += v;
    out[0] = static_cast<A>(total * static_cast<double>(scale));
  }
}

}  // namespace

void box_loss_forward_cpu(const BoxLossForward& args, int num_threads) {
  if (args.grad_pred && (args.output != box::kLoss || args.reduction == Reduction::None)) {
    throw std::invalid_argument("pyfast: box_loss_forward writes gradients only for a reduced loss");
  }
  dispatch_float(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    box::dispatch_box_loss<A>(args.options, [&](const auto& loss) { forward_impl<T>(loss, args, num_threads); });
  });
}

void box_loss_backward_cpu(const BoxLossBackward& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    box::dispatch_box_loss<A>(args.options, [&](const auto& loss) { backward_impl<T>(loss, args, num_threads); });
  });
}

}  // namespace pyfast
