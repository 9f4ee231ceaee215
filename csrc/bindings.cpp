// pybind11 module pyfast._C: thin wrappers that turn integer addresses into pointers and release
// the GIL around every kernel. All validation happens in Python (pyfast/ops/) before a pointer
// gets here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "box_loss/box_loss.h"
#include "mask_loss/mask_loss.h"
#include "pack/pack.h"

namespace py = pybind11;
using pyfast::BoxLossArgs;
using pyfast::MaskLossArgs;

namespace {

template <class T = void> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

BoxLossArgs box_args(int64_t n, int dtype, int mode, int format, double l1_weight, double iou_weight, double eps) {
  return BoxLossArgs{n, dtype, mode, format, l1_weight, iou_weight, eps};
}

MaskLossArgs mask_args(int64_t n, int64_t m, int dtype, int target_dtype, int focal, double bce_weight,
                       double dice_weight, double focal_weight, double alpha, double gamma, double smooth) {
  return MaskLossArgs{n, m, dtype, target_dtype, focal, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast native kernels (torch-free: raw pointers, sizes and CUDA streams)";
  m.attr("with_cuda") = bool(PYFAST_WITH_CUDA);
  m.attr("cuda_archs") = PYFAST_CUDA_ARCHS;

  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "box_loss_forward_cpu",
      [](int64_t n, int dtype, int mode, int format, double l1_weight, double iou_weight, double eps, uintptr_t pred,
         uintptr_t target, uintptr_t weight, uintptr_t out, int output, bool reduce, double scale, int threads) {
        pyfast::box_loss_forward_cpu(box_args(n, dtype, mode, format, l1_weight, iou_weight, eps), ptr(pred),
                                     ptr(target), ptr(weight), ptr(out), output, reduce, scale, threads);
      },
      nogil);
  m.def(
      "box_loss_backward_cpu",
      [](int64_t n, int dtype, int mode, int format, double l1_weight, double iou_weight, double eps,
         uintptr_t grad_out, bool grad_is_scalar, double scale, uintptr_t pred, uintptr_t target, uintptr_t weight,
         uintptr_t grad_pred, uintptr_t grad_target, uintptr_t grad_weight, int threads) {
        pyfast::box_loss_backward_cpu(box_args(n, dtype, mode, format, l1_weight, iou_weight, eps), ptr(grad_out),
                                      grad_is_scalar, scale, ptr(pred), ptr(target), ptr(weight), ptr(grad_pred),
                                      ptr(grad_target), ptr(grad_weight), threads);
      },
      nogil);
  m.def(
      "mask_loss_forward_cpu",
      [](int64_t n, int64_t m, int dtype, int target_dtype, int focal, double bce_weight, double dice_weight,
         double focal_weight, double alpha, double gamma, double smooth, uintptr_t logits, uintptr_t targets,
         uintptr_t sums, uintptr_t out, bool reduce, double scale, int threads) {
        pyfast::mask_loss_forward_cpu(
            mask_args(n, m, dtype, target_dtype, focal, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth),
            ptr(logits), ptr(targets), ptr(sums), ptr(out), reduce, scale, threads);
      },
      nogil);
  m.def(
      "mask_loss_backward_cpu",
      [](int64_t n, int64_t m, int dtype, int target_dtype, int focal, double bce_weight, double dice_weight,
         double focal_weight, double alpha, double gamma, double smooth, uintptr_t grad_out, bool grad_is_scalar,
         double scale, uintptr_t logits, uintptr_t targets, uintptr_t sums, uintptr_t grad_logits, int threads) {
        pyfast::mask_loss_backward_cpu(
            mask_args(n, m, dtype, target_dtype, focal, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth),
            ptr(grad_out), grad_is_scalar, scale, ptr(logits), ptr(targets), ptr(sums), ptr(grad_logits), threads);
      },
      nogil);
  m.def(
      "mask_iou_cpu",
      [](int64_t n, int64_t m, int dtype, int target_dtype, double threshold, uintptr_t logits, uintptr_t targets,
         uintptr_t iou, int threads) {
        pyfast::mask_iou_cpu(mask_args(n, m, dtype, target_dtype, 0, 0, 0, 0, 0, 0, 0), threshold, ptr(logits),
                             ptr(targets), ptr(iou), threads);
      },
      nogil);
  m.def(
      "pack_cpu",
      [](uintptr_t items, int64_t num_items, uintptr_t dst, int out_dtype, bool saturate, uintptr_t counts,
         uintptr_t absmax, int threads) {
        pyfast::pack_cpu(ptr<const pyfast::PackItem>(items), num_items, ptr(dst), out_dtype, saturate,
                         ptr<int64_t>(counts), ptr<double>(absmax), threads);
      },
      nogil);
  m.def("_pack_cpu_force_generic", &pyfast::pack_cpu_force_generic, "tests only: skip the AVX2 pack loops");
#if PYFAST_WITH_CUDA
  m.def(
      "pack_cuda",
      [](uintptr_t items, int64_t num_items, int64_t max_numel, uintptr_t dst, int out_dtype, bool saturate,
         uintptr_t counts, uintptr_t absmax, uintptr_t stream) {
        pyfast::pack_cuda(ptr<const pyfast::PackItem>(items), num_items, max_numel, ptr(dst), out_dtype, saturate,
                          ptr<int64_t>(counts), ptr<double>(absmax), stream);
      },
      nogil);
  m.def("box_loss_cuda_workspace", &pyfast::box_loss_cuda_workspace);
  m.def(
      "box_loss_forward_cuda",
      [](int64_t n, int dtype, int mode, int format, double l1_weight, double iou_weight, double eps, uintptr_t pred,
         uintptr_t target, uintptr_t weight, uintptr_t out, int output, bool reduce, double scale,
         uintptr_t workspace, uintptr_t stream) {
        pyfast::box_loss_forward_cuda(box_args(n, dtype, mode, format, l1_weight, iou_weight, eps), ptr(pred),
                                      ptr(target), ptr(weight), ptr(out), output, reduce, scale, ptr(workspace),
                                      stream);
      },
      nogil);
  m.def(
      "box_loss_backward_cuda",
      [](int64_t n, int dtype, int mode, int format, double l1_weight, double iou_weight, double eps,
         uintptr_t grad_out, bool grad_is_scalar, double scale, uintptr_t pred, uintptr_t target, uintptr_t weight,
         uintptr_t grad_pred, uintptr_t grad_target, uintptr_t grad_weight, uintptr_t stream) {
        pyfast::box_loss_backward_cuda(box_args(n, dtype, mode, format, l1_weight, iou_weight, eps), ptr(grad_out),
                                       grad_is_scalar, scale, ptr(pred), ptr(target), ptr(weight), ptr(grad_pred),
                                       ptr(grad_target), ptr(grad_weight), stream);
      },
      nogil);
  m.def("mask_loss_cuda_workspace", &pyfast::mask_loss_cuda_workspace);
  m.def(
      "mask_loss_forward_cuda",
      [](int64_t n, int64_t m, int dtype, int target_dtype, int focal, double bce_weight, double dice_weight,
         double focal_weight, double alpha, double gamma, double smooth, uintptr_t logits, uintptr_t targets,
         uintptr_t sums, uintptr_t out, bool reduce, double scale, uintptr_t workspace, uintptr_t stream) {
        pyfast::mask_loss_forward_cuda(
            mask_args(n, m, dtype, target_dtype, focal, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth),
            ptr(logits), ptr(targets), ptr(sums), ptr(out), reduce, scale, ptr(workspace), stream);
      },
      nogil);
  m.def(
      "mask_loss_backward_cuda",
      [](int64_t n, int64_t m, int dtype, int target_dtype, int focal, double bce_weight, double dice_weight,
         double focal_weight, double alpha, double gamma, double smooth, uintptr_t grad_out, bool grad_is_scalar,
         double scale, uintptr_t logits, uintptr_t targets, uintptr_t sums, uintptr_t grad_logits,
         uintptr_t workspace, uintptr_t stream) {
        pyfast::mask_loss_backward_cuda(
            mask_args(n, m, dtype, target_dtype, focal, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth),
            ptr(grad_out), grad_is_scalar, scale, ptr(logits), ptr(targets), ptr(sums), ptr(grad_logits),
            ptr(workspace), stream);
      },
      nogil);
  m.def(
      "mask_iou_cuda",
      [](int64_t n, int64_t m, int dtype, int target_dtype, double threshold, uintptr_t logits, uintptr_t targets,
         uintptr_t iou, uintptr_t workspace, uintptr_t stream) {
        pyfast::mask_iou_cuda(mask_args(n, m, dtype, target_dtype, 0, 0, 0, 0, 0, 0, 0), threshold, ptr(logits),
                              ptr(targets), ptr(iou), ptr(workspace), stream);
      },
      nogil);
#endif
}
