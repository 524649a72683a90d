// Attention over the paged KV cache, for XLA's CPU backend (an XLA FFI handler).
//
// Why it exists: in pure JAX on XLA CPU, attention over pages must gather each block
// of pages into a temporary before the dots read it, so the KV bytes cross memory
// about three times, and a prefill chunk also pays for masking and for the keys that
// causality hides. This kernel reads each key and value row straight from the pool,
// only up to each query's own position. kernels/cpu_paged_attention.py builds and
// registers it; kernels/paged_attention.py is the reference it is tested against
// (tests/test_cpu_kernels.py).
//
// Layouts: q (S, Q, H, D) float32; caches (L, pages, KV, page_size, D) float32, float16
// or bfloat16 (read as float32: a 16-bit cache moves half the bytes); page_table
// (S, P); positions (S, Q); kv_lens (S,); out (S, Q, H, D). Query heads h = kv * group
// + g. Query (s, i) sees tokens t < min(kv_lens[s], positions[s, i] + 1). A unit of
// work is one query token and one kv head; units of the same sequence run in order,
// so its pages stay in cache between them.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu_simd.h"
#include "cpu_paged.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using sgljax::BF16;
using sgljax::F16;

inline float ToFloat(float x) { return x; }
inline float ToFloat(BF16 x) {
  const uint32_t u = uint32_t{x.bits} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float ToFloat(F16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = uint32_t{x.bits & 0x8000u} << 16, exp = (x.bits >> 10) & 0x1f,
                 man = x.bits & 0x3ff;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);  // zero and subnormals
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    const uint32_t u = ((exp + 112) << 23) | (man << 13);
    std::memcpy(&f, &u, 4);
  }
  return sign ? -f : f;
#endif
}

struct Job : sgljax::PagedArgs {  // the caches' element type is the T of RunUnit<T>
  const float* q;
  float* out;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Softmax of one query head's scores, in place (vectorized exp under -ffast-math).
void Softmax(float* sg, int64_t n) {
  float mx = sg[0];
  for (int64_t t = 1; t < n; ++t) mx = std::max(mx, sg[t]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    sg[t] = std::exp(sg[t] - mx);
    sum += sg[t];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
}

#if defined(__AVX512F__)
using sgljax::SumRows16;

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 Load16(const BF16* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// Pages are scattered over the pool, so the hardware prefetcher stops at each page's
// end: ask for the next page's rows of this head into L1 while the current one is
// used, and for a page kAhead further on into L2.
template <int Hint = _MM_HINT_T0, typename T>
inline void PrefetchPage(const T* rows, int64_t count) {
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t b = 0; b < count * int64_t{sizeof(T)}; b += 64)
    _mm_prefetch(p + b, static_cast<_mm_hint>(Hint));
}

// How many pages ahead the second prefetch (into L2) reaches: one page of compute is
// shorter than a trip to memory. 2 pages gained 8%, 4 and 8 about 11% at batch 64 x 600.
constexpr int64_t kAhead = 4;

// A page's 16 rows as float32 for every query head of the group. A 16-bit page is
// widened once into `scratch` (in L1): widening takes the FMA ports, so doing it
// once instead of once per query head leaves them to the dots.
template <int D, typename T>
inline const float* Widened(const T* rows, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return rows;
  } else {
    for (int i = 0; i < 16 * D; i += 16) _mm512_storeu_ps(scratch + i, Load16(rows + i));
    return scratch;
  }
}

// One (sequence, kv head) with head_dim D, pages of 16 rows: all `group` query heads
// that share the kv head. Pass 1 writes scores, pass 2 sums values; the page being
// read stays in L1 while every query head of the group uses it.
template <int D, typename T>
void RunUnit16(const Job& j, int64_t unit, std::vector<float>& scores) {
  alignas(64) float scratch[16 * D];
  constexpr int C = D / 16;
  const int64_t row = unit / j.KV, kh = unit % j.KV, s = row / j.Q, group = j.H / j.KV;
  float* out = j.out + (row * j.H + kh * group) * D;
  const int64_t n = std::min<int64_t>(j.kv_lens[s], int64_t{j.positions[row]} + 1);
  if (n <= 0) {
    std::fill(out, out + group * D, 0.0f);
    return;
  }
  const int64_t padded = (n + 15) / 16 * 16;
  scores.resize(group * padded);
  const float* q = j.q + (row * j.H + kh * group) * D;
  const int32_t* pages = j.table + s * j.table_width;
  const int64_t page_stride = j.KV * 16 * D;
  const T* kbase = static_cast<const T*>(j.k) + j.layer * j.num_pages * page_stride + kh * 16 * D;
  const T* vbase = static_cast<const T*>(j.v) + j.layer * j.num_pages * page_stride + kh * 16 * D;
  const __m512 scale = _mm512_set1_ps(j.scale);

  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    if (t0 + 16 < n) PrefetchPage(kbase + pages[t0 / 16 + 1] * page_stride, 16 * D);
    if (t0 + kAhead * 16 < n)
      PrefetchPage<_MM_HINT_T1>(kbase + pages[t0 / 16 + kAhead] * page_stride, 16 * D);
    const float* kp = Widened<D>(kbase + pages[t0 / 16] * page_stride, scratch);
    for (int64_t g = 0; g < group; ++g) {
      __m512 qv[C], rows[16];
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + g * D + c * 16);
      for (int r = 0; r < 16; ++r) {
        __m512 acc = _mm512_mul_ps(qv[0], Load16(kp + r * D));
        for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], Load16(kp + r * D + c * 16), acc);
        rows[r] = acc;
      }
      _mm512_storeu_ps(scores.data() + g * padded + t0, _mm512_mul_ps(SumRows16(rows), scale));
    }
  }
  for (int64_t g = 0; g < group; ++g) Softmax(scores.data() + g * padded, n);
  for (int64_t g = 0; g < group; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + c * 16, _mm512_setzero_ps());
  PrefetchPage(vbase + pages[0] * page_stride, 16 * D);
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    if (t0 + 16 < n) PrefetchPage(vbase + pages[t0 / 16 + 1] * page_stride, 16 * D);
    if (t0 + kAhead * 16 < n)
      PrefetchPage<_MM_HINT_T1>(vbase + pages[t0 / 16 + kAhead] * page_stride, 16 * D);
    const float* vp = Widened<D>(vbase + pages[t0 / 16] * page_stride, scratch);
    const int64_t rows = std::min<int64_t>(16, n - t0);
    for (int64_t g = 0; g < group; ++g) {
      const float* w = scores.data() + g * padded + t0;
      __m512 acc[C];
      for (int c = 0; c < C; ++c) acc[c] = _mm512_loadu_ps(out + g * D + c * 16);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 wr = _mm512_set1_ps(w[r]);
        for (int c = 0; c < C; ++c)
          acc[c] = _mm512_fmadd_ps(wr, Load16(vp + r * D + c * 16), acc[c]);
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + c * 16, acc[c]);
    }
  }
}
#endif

// Any head_dim and page size, scalar loops the compiler vectorizes.
template <typename T>
void RunUnitGeneric(const Job& j, int64_t unit, std::vector<float>& scores) {
  const int64_t row = unit / j.KV, kh = unit % j.KV, s = row / j.Q, group = j.H / j.KV;
  const int64_t D = j.D;
  float* out = j.out + (row * j.H + kh * group) * D;
  const int64_t n = std::min<int64_t>(j.kv_lens[s], int64_t{j.positions[row]} + 1);
  std::fill(out, out + group * D, 0.0f);
  if (n <= 0) return;
  scores.resize(group * n);
  const float* q = j.q + (row * j.H + kh * group) * D;
  const int32_t* pages = j.table + s * j.table_width;
  const int64_t page_stride = j.KV * j.page_size * D;
  const int64_t head_base = j.layer * j.num_pages * page_stride + kh * j.page_size * D;

  for (int64_t t0 = 0; t0 < n; t0 += j.page_size) {
    const T* kp = static_cast<const T*>(j.k) + head_base + pages[t0 / j.page_size] * page_stride;
    const int64_t rows = std::min(j.page_size, n - t0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* kr = kp + r * D;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * ToFloat(kr[d]);
        scores[g * n + t0 + r] = dot * j.scale;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) Softmax(scores.data() + g * n, n);
  for (int64_t t0 = 0; t0 < n; t0 += j.page_size) {
    const T* vp = static_cast<const T*>(j.v) + head_base + pages[t0 / j.page_size] * page_stride;
    const int64_t rows = std::min(j.page_size, n - t0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* vr = vp + r * D;
      for (int64_t g = 0; g < group; ++g) {
        const float w = scores[g * n + t0 + r];
        float* og = out + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) og[d] += w * ToFloat(vr[d]);
      }
    }
  }
}

template <typename T>
void RunUnit(const Job& j, int64_t unit, std::vector<float>& scores) {
#if defined(__AVX512F__)
  if (j.page_size == 16 && j.D == 64) return RunUnit16<64, T>(j, unit, scores);
  if (j.page_size == 16 && j.D == 128) return RunUnit16<128, T>(j, unit, scores);
#endif
  RunUnitGeneric<T>(j, unit, scores);
}

template <typename T>
void Work(Job& j) {
  std::vector<float> scores;
  const int64_t units = j.S * j.Q * j.KV;
  for (int64_t u; (u = j.next.fetch_add(1)) < units;) {
    RunUnit<T>(j, u, scores);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                           ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> kv_lens,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto job = std::make_shared<Job>();
  if (auto err = sgljax::ReadPagedArgs("paged attention", q.dimensions(), k_cache, v_cache,
                                       layer, page_table, positions, kv_lens, *job);
      !err.success()) {
    return err;
  }
  job->q = q.typed_data();
  job->out = out->typed_data();
  const int64_t units = job->S * job->Q * job->KV;
  sgljax::WithCacheType(job->kv_type, [&](auto element) {
    sgljax::ShareWork(pool, job, units, Work<decltype(element)>);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SgljaxPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Ret<ffi::Buffer<ffi::F32>>());
