// pybind11 module pyfast._C: thin wrappers that turn integer addresses into pointers and release
// the GIL around every kernel. All validation happens in Python (pyfast/ops/) before a pointer
// gets here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "box_loss/box_loss.h"
#include "pack/pack.h"

namespace py = pybind11;
using pyfast::BoxLossArgs;

namespace {

template <class T = void> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

BoxLossArgs box_args(int64_t n, int dtype, int mode, int format, double l1_weight, double iou_weight, double eps) {
  return BoxLossArgs{n, dtype, mode, format, l1_weight, iou_weight, eps};
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
#endif
}
