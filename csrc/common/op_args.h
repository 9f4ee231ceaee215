// The pieces every op's argument structs are made of.
//
// Each kernel entry point takes one struct of named fields (bound field by field in bindings.cpp,
// where every field is a required keyword), so no argument can land in another's place, and a new
// parameter is one named field rather than one more position in a long list.
#pragma once

#include <cstdint>

namespace pyfast {

// A host or device address: a tensor's data_ptr(), or null for an optional tensor left out.
struct Address {
  uintptr_t raw = 0;
  template <class T> T* as() const { return reinterpret_cast<T*>(raw); }
  explicit operator bool() const { return raw != 0; }
};

enum class Reduction : int { None = 0, Sum = 1, Mean = 2 };

// The factor a summed loss is multiplied by: 1 / avg_factor (when > 0) or 1 / max(n, 1) for a mean,
// 1 otherwise.
inline double reduction_scale(Reduction reduction, int64_t n, double avg_factor) {
  if (reduction != Reduction::Mean) return 1.0;
  if (avg_factor > 0.0) return 1.0 / avg_factor;
  return 1.0 / static_cast<double>(n > 1 ? n : 1);
}

// How a CUDA entry point runs: on `device` (made current for the launch and restored after), in
// `stream` (the caller's current stream), with `workspace` scratch memory of the size the entry's
// `*_cuda_workspace` function asked for (bytes, from the caller's caching allocator).
struct CudaLaunch {
  int device = 0;
  uintptr_t stream = 0;
  Address workspace;
};

}  // namespace pyfast
