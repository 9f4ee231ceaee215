// Element types, host/device qualifiers and the conversions shared by every kernel.
//
// The kernels never see torch: Python passes a DType (bound as `pyfast._C.DType`, which
// pyfast/_native.py maps to torch dtypes by name) and raw addresses.
// Half and bfloat16 are carried as 16-bit storage types; the conversions below are the IEEE
// round-to-nearest-even ones torch itself uses, so a value cast here is bit-identical to
// `tensor.to(dtype)` for every finite input.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PYFAST_HD __host__ __device__ __forceinline__
#else
// Always inlined: the per-element math must inline into the loops for them to vectorize.
#define PYFAST_HD inline __attribute__((always_inline))
// The same for a lambda a loop calls per element or per box (`[&](...) PYFAST_ELEM_LAMBDA {}`):
// GCC leaves a large one out of line, and the loop calls it element by element.
#define PYFAST_ELEM_LAMBDA __attribute__((always_inline))
#endif

namespace pyfast {

// Storage types the kernels read and write. UInt8 holds binary masks (bool or uint8 targets).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, UInt8 = 4 };

struct alignas(2) Half {
  uint16_t bits;
};
struct alignas(2) BFloat16 {
  uint16_t bits;
};

PYFAST_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

PYFAST_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

PYFAST_HD uint64_t double_to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  return u;
#endif
}

PYFAST_HD double bits_to_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double d;
  std::memcpy(&d, &u, sizeof(d));
  return d;
#endif
}

// Branch-free IEEE half <-> float (the classic FP16-library formulation, as in c10::Half).
PYFAST_HD float half_to_float(Half h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
#endif
}

PYFAST_HD Half float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(f))};
#else
  const float abs_f = f < 0.0f ? -f : f;
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

PYFAST_HD float bfloat16_to_float(BFloat16 b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }

PYFAST_HD BFloat16 float_to_bfloat16(float f) {
  if (f != f) return BFloat16{0x7FC0};  // canonical quiet NaN, as c10::BFloat16
  const uint32_t u = float_to_bits(f);
  return BFloat16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// Acc<T>::type is the arithmetic type for storage type T: float for 16/32-bit, double for double.
template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };


template <class A, class T> PYFAST_HD A to_acc(T v) { return static_cast<A>(v); }
template <> PYFAST_HD float to_acc<float, Half>(Half v) { return half_to_float(v); }
template <> PYFAST_HD float to_acc<float, BFloat16>(BFloat16 v) { return bfloat16_to_float(v); }

template <class T, class A> PYFAST_HD T from_acc(A v) { return static_cast<T>(v); }
template <> PYFAST_HD Half from_acc<Half, float>(float v) { return float_to_half(v); }
template <> PYFAST_HD BFloat16 from_acc<BFloat16, float>(float v) { return float_to_bfloat16(v); }

}  // namespace pyfast
