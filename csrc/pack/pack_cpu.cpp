// CPU kernel of pyfast.pack: the items are cut into fixed-size chunks, threads take chunks, and
// each chunk casts its elements and keeps its own statistics; the per-item totals are summed in
// chunk order afterwards (integer counts and a max: the same result on any thread count).
//
// The chunk loop is compiled twice: for the baseline x86-64 ISA and for AVX2 + F16C, picked once
// at run time, so the statistics ride along with a vectorized cast instead of costing a second pass.
// float32 -> float16, the common case, has a hand-written AVX2 body on the hardware conversion.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <vector>

#include "common/dispatch.h"
#include "common/parallel.h"
#include "pack/pack.h"
#include "pack/pack_convert.h"

namespace pyfast {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements; a chunk's counts fit in 32 bits
// Below ~128k elements (512 KB of float32) a second thread costs more than it saves: at 1 MB
// two threads on torch's warm OpenMP workers took a one-tensor pack from 70-75 to 55-66 µs.
constexpr int64_t kMinChunksPerThread = 2;

// Set by tests to run the baseline-ISA loops on machines that have AVX2.
std::atomic<bool> force_generic{false};

struct ChunkStats {
  int64_t nonfinite = 0, overflow = 0;
  double absmax = 0.0;
};

struct Chunk {
  int64_t item, begin, end;
};

template <class S, class D, bool kSaturate>
inline ChunkStats convert_range(const S* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  // 32-bit lane counters vectorize with float lanes; n <= kChunk keeps them exact.
  int32_t nonfinite = 0, overflow = 0;
  typename pack::Source<S>::Bits amax = 0;
  for (int64_t i = 0; i < n; ++i) dst[i] = pack::convert<S, D, kSaturate>(src[i], nonfinite, overflow, amax);
  return ChunkStats{nonfinite, overflow, pack::Source<S>::abs_value(amax)};
}

using RangeFn = ChunkStats (*)(const void*, uint16_t*, int64_t);

template <class S, class D, bool kSaturate> ChunkStats range_generic(const void* src, uint16_t* dst, int64_t n) {
  return convert_range<S, D, kSaturate>(static_cast<const S*>(src), dst, n);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYFAST_PACK_AVX2 1
template <class S, class D, bool kSaturate>
__attribute__((target("avx2,f16c,fma"))) ChunkStats range_avx2(const void* src, uint16_t* dst, int64_t n) {
  return convert_range<S, D, kSaturate>(static_cast<const S*>(src), dst, n);
}
// float32 -> float16, the hot path: the hardware conversion (vcvtps2ph, round-to-nearest-even,
// what torch's own vectorized cast uses) with the statistics computed from the source bits.
// Saturation clamps finite inputs to +-65504 before converting, which gives the same bits as
// replacing an overflowed +-inf afterwards (every finite |x| < 65520 rounds to at most 65504).
struct F16Acc {
  __m256i nonfinite, overflow, amax;
};

template <bool kSaturate>
__attribute__((target("avx2,f16c,fma"))) inline __m128i f32_f16_step(__m256 v, F16Acc& acc) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i inf_bits = _mm256_set1_epi32(0x7F800000);
  const __m256i overflow_bits = _mm256_set1_epi32(0x477FEFFF);  // |x| > this (i.e. >= 65520) overflows
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
  const __m256i finite = _mm256_cmpgt_epi32(inf_bits, a);
  const __m256i over = _mm256_and_si256(finite, _mm256_cmpgt_epi32(a, overflow_bits));
  acc.nonfinite = _mm256_sub_epi32(acc.nonfinite, _mm256_andnot_si256(finite, _mm256_set1_epi32(-1)));
  acc.overflow = _mm256_sub_epi32(acc.overflow, over);
  acc.amax = _mm256_max_epu32(acc.amax, _mm256_and_si256(a, finite));
  if (kSaturate) {
    const __m256 top = _mm256_set1_ps(65504.0f);
    const __m256 clamped = _mm256_max_ps(_mm256_min_ps(v, top), _mm256_sub_ps(_mm256_setzero_ps(), top));
    v = _mm256_blendv_ps(v, clamped, _mm256_castsi256_ps(finite));
  }
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// float32 -> float16, the hot path: the hardware conversion (vcvtps2ph, round-to-nearest-even,
// what torch's own vectorized cast uses) with the statistics computed from the source bits.
// Saturation clamps finite inputs to +-65504 before converting, which gives the same bits as
// replacing an overflowed +-inf afterwards (every finite |x| < 65520 rounds to at most 65504).
template <bool kSaturate>
__attribute__((target("avx2,f16c,fma"))) ChunkStats f32_f16_avx2(const void* src_v, uint16_t* dst, int64_t n) {
  const float* src = static_cast<const float*>(src_v);
  F16Acc acc{_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), f32_f16_step<kSaturate>(_mm256_loadu_ps(src + i), acc));
  }
  if (i < n) {  // the tail through the same vector body, zero-padded (zeros change no statistic)
    alignas(32) float in[8] = {0};
    alignas(16) uint16_t out[8];
    std::memcpy(in, src + i, (n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(out), f32_f16_step<kSaturate>(_mm256_load_ps(in), acc));
    std::memcpy(dst + i, out, (n - i) * sizeof(uint16_t));
  }
  alignas(32) int32_t nf[8], ov[8];
  alignas(32) uint32_t am[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(nf), acc.nonfinite);
  _mm256_store_si256(reinterpret_cast<__m256i*>(ov), acc.overflow);
  _mm256_store_si256(reinterpret_cast<__m256i*>(am), acc.amax);
  ChunkStats stats;
  uint32_t amax_bits = 0;
  for (int k = 0; k < 8; ++k) {
    stats.nonfinite += nf[k];
    stats.overflow += ov[k];
    amax_bits = std::max(amax_bits, am[k]);
  }
  stats.absmax = bits_to_float(amax_bits);
  return stats;
}

bool has_avx2() {
  static const bool value = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return value && !force_generic.load(std::memory_order_relaxed);
}
#endif

template <class S, class D, bool kSaturate> RangeFn pick_range() {
#ifdef PYFAST_PACK_AVX2
  if constexpr (std::is_same<S, float>::value && std::is_same<D, Half>::value) {
    if (has_avx2()) return &f32_f16_avx2<kSaturate>;
  }
  if (has_avx2()) return &range_avx2<S, D, kSaturate>;
#endif
  return &range_generic<S, D, kSaturate>;
}

RangeFn range_for(DType src_dtype, DType out_dtype, bool saturate) {
  return dispatch_float(src_dtype, [&](auto src_tag) -> RangeFn {
    using S = decltype(src_tag);
    const bool half_out = out_dtype == DType::Float16;
    if (half_out) return saturate ? pick_range<S, Half, true>() : pick_range<S, Half, false>();
    return saturate ? pick_range<S, BFloat16, true>() : pick_range<S, BFloat16, false>();
  });
}

// A fresh output buffer costs more in first-touch page faults than the cast itself (32 MB of
// float16: 8192 faults, each zeroing a 4 KB page). Asking for transparent huge pages on the
// buffer's 2 MB-aligned interior cuts that to one fault per 2 MB, where the system allows them
// (THP "madvise" or "always"); torch's THP_MEM_ALLOC_ENABLE does the same for its allocations.
// Only a hint: an already-written buffer (pack's out=) keeps its pages, and a refusal is ignored.
void advise_huge_pages(void* dst, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(dst) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(dst) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#endif
}

}  // namespace

void pack_cpu_force_generic(bool on) { force_generic.store(on); }

void pack_cpu(const PackArgs& args, int num_threads) {
  const PackItem* items = args.items.as<const PackItem>();
  const int64_t num_items = args.num_items;
  const DType out_dtype = args.out_dtype;
  const bool saturate = args.saturate;
  int64_t* counts = args.counts.as<int64_t>();
  double* absmax = args.absmax.as<double>();
  if (out_dtype != DType::Float16 && out_dtype != DType::BFloat16) {
    throw std::invalid_argument("pyfast: pack output dtype must be float16 or bfloat16");
  }
  std::vector<RangeFn> fns(num_items);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < num_items; ++i) {
    fns[i] = range_for(static_cast<DType>(items[i].dtype), out_dtype, saturate);
    for (int64_t b = 0; b < items[i].numel; b += kChunk) chunks.push_back({i, b, std::min(items[i].numel, b + kChunk)});
  }
  std::vector<ChunkStats> stats(chunks.size());
  uint16_t* out = args.dst.as<uint16_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < num_items; ++i) total = std::max(total, items[i].offset + items[i].numel);
  advise_huge_pages(out, total * static_cast<int64_t>(sizeof(uint16_t)));
  parallel_blocks(static_cast<int64_t>(chunks.size()), num_threads, kMinChunksPerThread, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const PackItem& item = items[ch.item];
    const int64_t elem = dispatch_float(static_cast<DType>(item.dtype), [](auto tag) { return (int64_t)sizeof(tag); });
    const char* src = reinterpret_cast<const char*>(item.src) + ch.begin * elem;
    stats[c] = fns[ch.item](src, out + item.offset + ch.begin, ch.end - ch.begin);
  });
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t i = chunks[c].item;
    counts[2 * i] += stats[c].nonfinite;
    counts[2 * i + 1] += stats[c].overflow;
    absmax[i] = std::max(absmax[i], stats[c].absmax);
  }
}

}  // namespace pyfast
