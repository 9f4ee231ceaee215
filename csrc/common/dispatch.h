// Turns a runtime dtype code into a compile-time storage type.
#pragma once

#include <stdexcept>
#include <string>

#include "common/types.h"

namespace pyfast {

// Calls fn(T{}) with T the storage type of `dtype`; fn must be a generic lambda.
template <class Fn> decltype(auto) dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::Float16: return fn(Half{});
    case DType::BFloat16: return fn(BFloat16{});
    case DType::UInt8: break;
  }
  throw std::invalid_argument("pyfast: unsupported float dtype code " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace pyfast
