// Fused cast-and-pack: the entry points behind pyfast.pack.
//
// Many source tensors (float32/float64/float16/bfloat16, each contiguous) are cast into one
// contiguous float16 or bfloat16 buffer in a single pass that also gathers, per tensor, the
// statistics the error policies need. Pointers are validated by pyfast/ops/pack.py.
//
// A value "overflows" when it is finite in its source dtype but the round-to-nearest-even cast
// gives +-inf (for float16: |x| >= 65520). Every other value is stored exactly as `tensor.to(dtype)`
// stores it; with `saturate`, overflowing values become +-max instead of +-inf. Non-finite values
// are always stored as cast (the policy for them is applied in Python, from the counts).
#pragma once

#include <cstdint>

#include "common/op_args.h"
#include "common/types.h"

namespace pyfast {

// One source tensor. `offset` is in elements of the output buffer.
struct PackItem {
  int64_t src;     // address of the first element
  int64_t numel;
  int64_t offset;
  int64_t dtype;   // DType code
};
static_assert(sizeof(PackItem) == 32, "PackItem is read as 4 int64 per item from Python");

// Per item: counts[2*i] = non-finite values, counts[2*i+1] = overflowing values,
// absmax[i] = max |x| over the finite values (0 when there are none). `counts` and `absmax`
// must be zeroed by the caller (the CUDA kernel accumulates into them with atomics).
struct PackArgs {
  Address items;  // num_items PackItem rows: host memory for the CPU kernel, device memory for CUDA
  int64_t num_items = 0;
  int64_t max_numel = 0;  // the largest item (sizes the CUDA grid)
  DType out_dtype = DType::Float16;  // Float16 or BFloat16
  bool saturate = false;
  Address dst;     // sum of numel elements of out_dtype
  Address counts;  // num_items x 2 int64
  Address absmax;  // num_items double
};

void pack_cpu(const PackArgs& args, int num_threads);

// Tests only: use the baseline-ISA loops even where AVX2 + F16C are available.
void pack_cpu_force_generic(bool on);

#if PYFAST_WITH_CUDA
void pack_cuda(const PackArgs& args, const CudaLaunch& launch);
#endif

}  // namespace pyfast
