// CPU kernel of pyfast.pack: the items are cut into fixed-size chunks, threads take chunks, and
// each chunk casts its elements and keeps its own statistics; the per-item totals are summed in
// chunk order afterwards (integer counts and a max: the same result on any thread count).
//
// The chunk loop is compiled twice: for the baseline x86-64 ISA and for AVX2 + F16C, picked once
// at run time, so the statistics ride along with a vectorized cast instead of costing a second pass.
#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/parallel.h"
#include "pack/pack.h"
#include "pack/pack_convert.h"

namespace pyfast {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements; a chunk's counts fit in 32 bits
// Below ~256k elements (1 MB of float32) a second thread costs more to start than it saves.
constexpr int64_t kMinChunksPerThread = 4;

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
bool has_avx2() {
  static const bool value = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return value;
}
#endif

template <class S, class D, bool kSaturate> RangeFn pick_range() {
#ifdef PYFAST_PACK_AVX2
  if (has_avx2()) return &range_avx2<S, D, kSaturate>;
#endif
  return &range_generic<S, D, kSaturate>;
}

RangeFn range_for(int src_dtype, int out_dtype, bool saturate) {
  return dispatch_float(src_dtype, [&](auto src_tag) -> RangeFn {
    using S = decltype(src_tag);
    const bool half_out = static_cast<DType>(out_dtype) == DType::Float16;
    if (half_out) return saturate ? pick_range<S, Half, true>() : pick_range<S, Half, false>();
    return saturate ? pick_range<S, BFloat16, true>() : pick_range<S, BFloat16, false>();
  });
}

}  // namespace

void pack_cpu(const PackItem* items, int64_t num_items, void* dst, int out_dtype, bool saturate, int64_t* counts,
              double* absmax, int num_threads) {
  const auto out_code = static_cast<DType>(out_dtype);
  if (out_code != DType::Float16 && out_code != DType::BFloat16) {
    throw std::invalid_argument("pyfast: pack output dtype must be float16 or bfloat16");
  }
  std::vector<RangeFn> fns(num_items);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < num_items; ++i) {
    fns[i] = range_for(static_cast<int>(items[i].dtype), out_dtype, saturate);
    for (int64_t b = 0; b < items[i].numel; b += kChunk) chunks.push_back({i, b, std::min(items[i].numel, b + kChunk)});
  }
  std::vector<ChunkStats> stats(chunks.size());
  uint16_t* out = static_cast<uint16_t*>(dst);
  parallel_blocks(static_cast<int64_t>(chunks.size()), num_threads, kMinChunksPerThread, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const PackItem& item = items[ch.item];
    const int64_t elem = dispatch_float(static_cast<int>(item.dtype), [](auto tag) { return (int64_t)sizeof(tag); });
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
