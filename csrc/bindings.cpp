// pybind11 module pyfast._C: the kernels' argument structs, their enums and the entry points.
//
// Every entry point takes one argument struct, built in Python with every field as a keyword
// (`_C.BoxLossForward(n=..., pred=..., ...)`): a missing, unknown or positional field is a
// TypeError, so no value can land in another's place, and a new parameter is one named field.
// Enum fields take the enum or its member name ("giou"); address fields take a tensor (its
// data_ptr()), an int, or None (null); the nested options struct takes a dict of its fields.
// Python reads the enums from here (pyfast/_native.py) rather than repeating their values. The GIL
// is released around every kernel; validation happens in Python (pyfast/ops/) before a struct is
// built.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "box_loss/box_loss.h"
#include "common/device.h"
#include "common/op_args.h"
#include "common/parallel.h"
#include "mask_loss/mask_loss.h"
#include "pack/pack.h"

namespace py = pybind11;
using namespace pyfast;

namespace {

std::string type_name(py::handle value) { return py::str(py::type::handle_of(value).attr("__name__")); }

// The bound Python type of enum F and its name -> member dict (pybind11 builds __members__ anew on
// every access, so it is read once).
template <class F> struct EnumInfo {
  PyTypeObject* type;
  PyObject* members;
};
template <class F> const EnumInfo<F>& enum_info() {
  static const EnumInfo<F> info = [] {
    const py::object member = py::cast(F{});
    return EnumInfo<F>{Py_TYPE(member.ptr()), py::object(member.attr("__members__")).release().ptr()};
  }();
  return info;
}

template <class T> class Struct;

// One keyword value as field type F, or a TypeError/ValueError naming the struct and the field.
// Written against the C API: building an argument struct is on every op call's path.
template <class F> F field_value(py::handle value, const std::string& where) {
  PyObject* v = value.ptr();
  const auto wrong_type = [&] { return py::type_error(where + " cannot take a " + type_name(value)); };
  if constexpr (std::is_same<F, Address>::value) {
    if (v == Py_None) return Address{};
    static PyObject* data_ptr = PyUnicode_InternFromString("data_ptr");
    py::object address = PyLong_Check(v) ? py::reinterpret_borrow<py::object>(value)
                                          : py::reinterpret_steal<py::object>(PyObject_CallMethodObjArgs(v, data_ptr, nullptr));
    if (!address) {
      PyErr_Clear();
      throw py::type_error(where + " takes a tensor, an address or None, got " + type_name(value));
    }
    const unsigned long long raw = PyLong_AsUnsignedLongLong(address.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error(where + " is not a valid address");
    }
    return Address{static_cast<uintptr_t>(raw)};
  } else if constexpr (std::is_same<F, bool>::value) {
    if (v == Py_True) return true;
    if (v == Py_False) return false;
    throw wrong_type();
  } else if constexpr (std::is_floating_point<F>::value) {
    if (!PyFloat_Check(v) && !(PyLong_Check(v) && !PyBool_Check(v))) throw wrong_type();
    const double x = PyFloat_AsDouble(v);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error(where + " is out of range");
    }
    return static_cast<F>(x);
  } else if constexpr (std::is_integral<F>::value) {
    if (!PyLong_Check(v) || PyBool_Check(v)) throw wrong_type();
    const long long x = PyLong_AsLongLong(v);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error(where + " is out of range");
    }
    return static_cast<F>(x);
  } else if constexpr (std::is_enum<F>::value) {
    const EnumInfo<F>& info = enum_info<F>();
    PyObject* member = v;
    if (PyUnicode_Check(v)) {
      member = PyDict_GetItem(info.members, v);  // borrowed
      if (member == nullptr) {
        throw py::value_error(where + " must be one of " +
                              std::string(py::str(py::list(py::handle(info.members).attr("keys")()))) + ", got '" +
                              std::string(py::str(value)) + "'");
      }
    } else if (Py_TYPE(v) != info.type) {
      throw wrong_type();
    }
    return py::handle(member).cast<F>();
  } else {
    // A nested struct (the options), given as the struct or as a dict of its fields.
    if (PyDict_Check(v)) {
      F nested{};
      Struct<F>::fill(nested, v, where);
      return nested;
    }
    try {
      return value.cast<F>();
    } catch (const py::cast_error&) {
      throw wrong_type();
    }
  }
}

template <class F> py::object field_object(const F& value) {
  if constexpr (std::is_same<F, Address>::value) {
    return py::int_(value.raw);
  } else {
    return py::cast(value);
  }
}

// Binds struct T as a Python class: each field a read-write attribute, and a constructor that
// takes every field by keyword, no positional argument, no field left out, no unknown name.
template <class T> class Struct {
 public:
  Struct(py::module_& m, const char* name, const char* doc) : cls_(m, name, doc) {
    type_name() = name;
    cls_.def(py::init([](py::kwargs kwargs) {
      T value{};
      fill(value, kwargs.ptr(), type_name());
      return value;
    }));
    cls_.def("__repr__", [](py::handle self) {
      std::string text = type_name() + "(";
      for (size_t i = 0; i < setters().size(); ++i) {
        const std::string& field = setters()[i].name;
        text += (i ? ", " : "") + field + "=" + std::string(py::repr(self.attr(field.c_str())));
      }
      return text + ")";
    });
  }

  template <class F> Struct& field(const char* name, F T::*member) {
    const std::string where = type_name() + "." + name;
    auto set = [member, where](T& target, py::handle value) { target.*member = field_value<F>(value, where); };
    cls_.def_property(
        name, [member](const T& self) { return field_object(self.*member); }, set);
    setters().push_back({name, py::reinterpret_steal<py::object>(PyUnicode_InternFromString(name)), set});
    py::list names;
    for (const Setter& s : setters()) names.append(s.name);
    cls_.attr("fields") = py::tuple(names);  // the field names, in order
    return *this;
  }

  // Sets every field of `value` from the dict `kwargs`; `where` names the struct in errors.
  static void fill(T& value, PyObject* kwargs, const std::string& where) {
    for (const Setter& s : setters()) {
      PyObject* item = PyDict_GetItem(kwargs, s.key.ptr());  // borrowed
      if (item == nullptr) throw py::type_error(where + ": missing field '" + s.name + "'");
      s.set(value, item);
    }
    if (static_cast<size_t>(PyDict_Size(kwargs)) != setters().size()) {
      for (auto item : py::reinterpret_borrow<py::dict>(kwargs)) {
        const std::string key = py::str(item.first);
        bool known = false;
        for (const Setter& s : setters()) known = known || s.name == key;
        if (!known) throw py::type_error(where + ": unexpected field '" + key + "'");
      }
    }
  }

 private:
  struct Setter {
    std::string name;
    py::object key;  // the name as an interned str: a dict lookup without building a string
    std::function<void(T&, py::handle)> set;
  };
  static std::vector<Setter>& setters() {
    static auto* list = new std::vector<Setter>();  // never destroyed: it holds Python objects
    return *list;
  }
  static std::string& type_name() {
    static std::string name;
    return name;
  }
  py::class_<T> cls_;
};

// A CPU entry point: `name(args, *, threads)`.
template <class Args, class R> void def_cpu(py::module_& m, const char* name, R (*fn)(const Args&, int)) {
  m.def(
      name,
      [fn](const Args& args, int threads) {
        py::gil_scoped_release nogil;
        return fn(args, threads);
      },
      py::arg("args"), py::kw_only(), py::arg("threads"));
}

#if PYFAST_WITH_CUDA
template <class Args> int64_t no_workspace(const Args&) { return 0; }

// A CUDA entry point `name(args, *, device, stream, workspace)` and `name_workspace(args)`, the
// bytes of scratch memory it needs.
template <class Args, class R>
void def_cuda(py::module_& m, const std::string& name, R (*fn)(const Args&, const CudaLaunch&),
              int64_t (*workspace)(const Args&)) {
  m.def(
      name.c_str(),
      [fn](const Args& args, int device, uintptr_t stream, uintptr_t workspace) {
        py::gil_scoped_release nogil;
        return fn(args, CudaLaunch{device, stream, Address{workspace}});
      },
      py::arg("args"), py::kw_only(), py::arg("device"), py::arg("stream"), py::arg("workspace"));
  m.def((name + "_workspace").c_str(), workspace, py::arg("args"));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfast native kernels (torch-free: named argument structs of addresses, sizes and CUDA streams)";
  m.attr("with_cuda") = bool(PYFAST_WITH_CUDA);
  m.attr("cuda_archs") = PYFAST_CUDA_ARCHS;
#if PYFAST_WITH_CUDA
  m.attr("cuda_runtime_version") = cuda_runtime_version();
  m.def("cuda_driver_version", &cuda_driver_version,
        "The newest CUDA version the installed driver supports (e.g. 13000), 0 without a driver.");
#else
  m.attr("cuda_runtime_version") = 0;
#endif
  m.attr("mask_cpu_chunk") = kMaskCpuChunk;
  m.attr("mask_cpu_max_gradient_in_forward") = kMaskCpuMaxGradientInForward;
  m.def("cpu_parallel_backend", &cpu_parallel_backend,
        "What runs the CPU kernels' threads: 'openmp: <runtime library>' (torch's) or 'pool'.");

  // ---- enums ----
  py::enum_<DType>(m, "DType")
      .value("float32", DType::Float32)
      .value("float64", DType::Float64)
      .value("float16", DType::Float16)
      .value("bfloat16", DType::BFloat16)
      .value("uint8", DType::UInt8);
  py::enum_<Reduction>(m, "Reduction")
      .value("none", Reduction::None)
      .value("sum", Reduction::Sum)
      .value("mean", Reduction::Mean);
  py::enum_<box::Mode>(m, "BoxMode")
      .value("iou", box::kIoU)
      .value("giou", box::kGIoU)
      .value("diou", box::kDIoU)
      .value("ciou", box::kCIoU);
  py::enum_<box::Format>(m, "BoxFormat").value("xyxy", box::kXYXY).value("cxcywh", box::kCXCYWH);
  py::enum_<box::Output>(m, "BoxOutput").value("loss", box::kLoss).value("variant", box::kVariant);
  py::enum_<box::Weight>(m, "BoxWeight")
      .value("none", box::kNoWeight)
      .value("per_box", box::kPerBox)
      .value("per_coordinate", box::kPerCoordinate);
  py::enum_<mask::Focal>(m, "MaskFocal")
      .value("none", mask::kNoFocal)
      .value("gamma2", mask::kFocalGamma2)
      .value("general", mask::kFocalGeneral);
  py::enum_<mask::Sum>(m, "MaskSum")
      .value("ce", mask::kSumCE)
      .value("focal", mask::kSumFocal)
      .value("pt", mask::kSumPT)
      .value("p", mask::kSumP)
      .value("t", mask::kSumT)
      .value("bad_targets", mask::kSumBadTargets);

  // ---- argument structs ----
  Struct<BoxLossOptions>(m, "BoxLossOptions", "The keyword arguments of pyfast.box_loss that shape the math.")
      .field("mode", &BoxLossOptions::mode)
      .field("box_format", &BoxLossOptions::box_format)
      .field("l1_weight", &BoxLossOptions::l1_weight)
      .field("iou_weight", &BoxLossOptions::iou_weight)
      .field("eps", &BoxLossOptions::eps);
  Struct<BoxLossForward>(m, "BoxLossForward", "Arguments of box_loss_forward_*.")
      .field("options", &BoxLossForward::options)
      .field("n", &BoxLossForward::n)
      .field("dtype", &BoxLossForward::dtype)
      .field("pred", &BoxLossForward::pred)
      .field("target", &BoxLossForward::target)
      .field("weight_kind", &BoxLossForward::weight_kind)
      .field("weight", &BoxLossForward::weight)
      .field("output", &BoxLossForward::output)
      .field("reduction", &BoxLossForward::reduction)
      .field("avg_factor", &BoxLossForward::avg_factor)
      .field("out", &BoxLossForward::out)
      .field("grad_pred", &BoxLossForward::grad_pred)
      .field("grad_target", &BoxLossForward::grad_target);
  Struct<BoxLossBackward>(m, "BoxLossBackward", "Arguments of box_loss_backward_*.")
      .field("options", &BoxLossBackward::options)
      .field("n", &BoxLossBackward::n)
      .field("dtype", &BoxLossBackward::dtype)
      .field("pred", &BoxLossBackward::pred)
      .field("target", &BoxLossBackward::target)
      .field("weight_kind", &BoxLossBackward::weight_kind)
      .field("weight", &BoxLossBackward::weight)
      .field("reduction", &BoxLossBackward::reduction)
      .field("avg_factor", &BoxLossBackward::avg_factor)
      .field("grad_out", &BoxLossBackward::grad_out)
      .field("grad_pred", &BoxLossBackward::grad_pred)
      .field("grad_target", &BoxLossBackward::grad_target)
      .field("grad_weight", &BoxLossBackward::grad_weight);
  Struct<MaskLossOptions>(m, "MaskLossOptions", "The keyword arguments of pyfast.mask_loss that shape the math.")
      .field("bce_weight", &MaskLossOptions::bce_weight)
      .field("dice_weight", &MaskLossOptions::dice_weight)
      .field("focal_weight", &MaskLossOptions::focal_weight)
      .field("alpha", &MaskLossOptions::alpha)
      .field("gamma", &MaskLossOptions::gamma)
      .field("smooth", &MaskLossOptions::smooth);
  Struct<MaskLossForward>(m, "MaskLossForward", "Arguments of mask_loss_forward_*.")
      .field("options", &MaskLossForward::options)
      .field("n", &MaskLossForward::n)
      .field("m", &MaskLossForward::m)
      .field("dtype", &MaskLossForward::dtype)
      .field("target_dtype", &MaskLossForward::target_dtype)
      .field("logits", &MaskLossForward::logits)
      .field("targets", &MaskLossForward::targets)
      .field("reduction", &MaskLossForward::reduction)
      .field("avg_factor", &MaskLossForward::avg_factor)
      .field("sums", &MaskLossForward::sums)
      .field("out", &MaskLossForward::out)
      .field("grad_logits", &MaskLossForward::grad_logits);
  Struct<MaskLossBackward>(m, "MaskLossBackward", "Arguments of mask_loss_backward_*.")
      .field("options", &MaskLossBackward::options)
      .field("n", &MaskLossBackward::n)
      .field("m", &MaskLossBackward::m)
      .field("dtype", &MaskLossBackward::dtype)
      .field("target_dtype", &MaskLossBackward::target_dtype)
      .field("logits", &MaskLossBackward::logits)
      .field("targets", &MaskLossBackward::targets)
      .field("sums", &MaskLossBackward::sums)
      .field("reduction", &MaskLossBackward::reduction)
      .field("avg_factor", &MaskLossBackward::avg_factor)
      .field("grad_out", &MaskLossBackward::grad_out)
      .field("grad_logits", &MaskLossBackward::grad_logits);
  Struct<MaskIoU>(m, "MaskIoU", "Arguments of mask_iou_*.")
      .field("n", &MaskIoU::n)
      .field("m", &MaskIoU::m)
      .field("dtype", &MaskIoU::dtype)
      .field("target_dtype", &MaskIoU::target_dtype)
      .field("logits", &MaskIoU::logits)
      .field("targets", &MaskIoU::targets)
      .field("threshold", &MaskIoU::threshold)
      .field("iou", &MaskIoU::iou);
  Struct<PackArgs>(m, "PackArgs", "Arguments of pack_*.")
      .field("items", &PackArgs::items)
      .field("num_items", &PackArgs::num_items)
      .field("max_numel", &PackArgs::max_numel)
      .field("out_dtype", &PackArgs::out_dtype)
      .field("saturate", &PackArgs::saturate)
      .field("dst", &PackArgs::dst)
      .field("counts", &PackArgs::counts)
      .field("absmax", &PackArgs::absmax);

  m.def("mask_focal_mode", &focal_mode, py::arg("options"), "The focal term the mask kernels compile in.");

  // ---- entry points ----
  def_cpu(m, "box_loss_forward_cpu", &box_loss_forward_cpu);
  def_cpu(m, "box_loss_backward_cpu", &box_loss_backward_cpu);
  def_cpu(m, "mask_loss_forward_cpu", &mask_loss_forward_cpu);
  def_cpu(m, "mask_loss_backward_cpu", &mask_loss_backward_cpu);
  def_cpu(m, "mask_iou_cpu", &mask_iou_cpu);
  m.def("_mask_loss_cpu_force_generic", &mask_loss_cpu_force_generic, "tests only: skip the AVX2 mask loss loops");
  def_cpu(m, "pack_cpu", &pack_cpu);
  m.def("_pack_cpu_force_generic", &pack_cpu_force_generic, "tests only: skip the AVX2 pack loops");
#if PYFAST_WITH_CUDA
  def_cuda(m, "box_loss_forward_cuda", &box_loss_forward_cuda, &box_loss_forward_cuda_workspace);
  def_cuda(m, "box_loss_backward_cuda", &box_loss_backward_cuda, &no_workspace<BoxLossBackward>);
  def_cuda(m, "mask_loss_forward_cuda", &mask_loss_forward_cuda, &mask_loss_forward_cuda_workspace);
  def_cuda(m, "mask_loss_backward_cuda", &mask_loss_backward_cuda, &mask_loss_backward_cuda_workspace);
  def_cuda(m, "mask_iou_cuda", &mask_iou_cuda, &mask_iou_cuda_workspace);
  def_cuda(m, "pack_cuda", &pack_cuda, &no_workspace<PackArgs>);
#endif
}
