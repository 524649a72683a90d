// Ragged attention over the paged KV cache, for XLA's CPU backend (an XLA FFI handler).
//
// Why it exists: in pure JAX on XLA CPU, attention over pages must gather each block
// of pages into a temporary before the dots read it, so the KV bytes cross memory
// about three times, and a prefill chunk also pays for masking and for the keys that
// causality hides. This kernel reads each key and value row straight from the pool,
// only up to each query's own position. kernels/cpu_paged_attention.py builds and
// registers it; kernels/paged_attention.py is the contract and the reference it is
// tested against (tests/test_cpu_kernels.py).
//
// Layouts (kernels/cpu_paged.h): q (T, H, D) float32; caches (L, pages, KV, page_size,
// D) float32, float16 or bfloat16 (read as float32: a 16-bit cache moves half the
// bytes); page_table (S, P); cu_q_lens (S + 1,); kv_lens (S,); num_seqs (); out (T, H,
// D). Query heads h = kv * group + g. Query token t of sequence s sits at position
// kv_lens[s] - q_len + (t - cu_q_lens[s]) and sees the keys up to it (the last
// sliding_window of them when that is > 0). Tokens of no sequence get zeros.
//
// A unit of work is one decode token, or up to kBlockTokens consecutive tokens of a
// prefill chunk, with all its heads. It walks its sequence's pages once, in order,
// keeping an online softmax per (token, head) (running max, denominator and weighted
// sum of values): no scores buffer over the context. A page of one layer is KV x
// page_size x D contiguous in K and in V; each band of 16 keys of it is read as K of
// every kv head (scores, max, probabilities), then V of every kv head (the sums), and
// each token of the unit uses a band only up to its own position. Units go to the
// threads longest first, so each page is read once per unit. 64 decode tokens x 540
// keys (SmolLM2's heads, benchmarks/attention_kernels.py): ~30 GB/s of K+V on an idle
// 2-core machine, its read ceiling, for float32 and float16 caches.
//
// Token trees (speculative decoding): tree_bits (T,) or (0,) narrows what a query sees
// among the 31 keys before it (bit d: the key d back; kernels/paged_attention.py). Units
// holding a token with bits other than -1 run the scalar path, which tests each key.
//
// bf16_products rounds q, k, v and the probabilities to bfloat16 and keeps every sum
// in float32 (the reference's ragged_paged_attention(..., bf16_products=True)).

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

constexpr int64_t kBlockTokens = 8;  // prefill tokens of one unit: they share each page read
constexpr float kMaskValue = -1e30f;  // the running max before any key

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

inline float RoundBf16(float x) {  // to bfloat16, nearest even, and back
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

struct Unit {
  int64_t s, t0, n;  // tokens [t0, t0 + n) of sequence s
  int64_t cost;  // keys x tokens, for the longest-first order
  bool tree;  // a token of it sees only some of the keys just before it
};

constexpr int64_t kTreeSpan = 32;  // keys back that tree_bits covers

struct Job : sgljax::PagedArgs {  // the caches' element type is the T of RunUnit<T>
  const float* q;
  float* out;
  bool bf16;
  int64_t window;  // 0: every key up to the query
  const int32_t* tree_bits;  // (T,) or nullptr: no trees
  std::vector<Unit> units;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// A thread's state for one unit: per (token, head) the scaled query and the online
// softmax's running max, denominator and weighted sum of values.
struct Scratch {
  std::vector<float> q, acc, m, l, p;
  int64_t pos[kBlockTokens], lo[kBlockTokens];
  int32_t bits[kBlockTokens];  // tree_bits of the unit's tokens (-1: causal)
  alignas(64) float kw[16 * 128];  // a tile's rows widened (or rounded) to float32
  alignas(64) float vw[16 * 128];
};

// Fills the scratch for unit u: positions, the key each token starts at, q (rounded to
// bf16 under bf16_products, then scaled) and an empty softmax.
void Begin(const Job& j, const Unit& u, Scratch& w) {
  const int64_t HD = j.H * j.D;
  for (int64_t i = 0; i < u.n; ++i) {
    w.pos[i] = j.Pos(u.s, u.t0 + i);
    w.lo[i] = j.window > 0 ? std::max<int64_t>(0, w.pos[i] - j.window + 1) : 0;
    w.bits[i] = j.tree_bits ? j.tree_bits[u.t0 + i] : -1;
  }
  w.q.resize(u.n * HD);
  const float* q = j.q + u.t0 * HD;
  for (int64_t x = 0; x < u.n * HD; ++x) w.q[x] = (j.bf16 ? RoundBf16(q[x]) : q[x]) * j.scale;
  w.acc.assign(u.n * HD, 0.0f);
  w.m.assign(u.n * j.H, kMaskValue);
  w.l.assign(u.n * j.H, 0.0f);
}

void Finish(const Job& j, const Unit& u, Scratch& w) {
  float* out = j.out + u.t0 * j.H * j.D;
  for (int64_t x = 0; x < u.n * j.H; ++x) {
    const float inv = 1.0f / std::max(w.l[x], 1e-30f);  // a real token sees itself: l > 0
    for (int64_t d = 0; d < j.D; ++d) out[x * j.D + d] = w.acc[x * j.D + d] * inv;
  }
}

#if defined(__AVX512F__)
using sgljax::Exp16;
using sgljax::FirstLanes;
using sgljax::SumRows16;

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const F16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 Load16(const BF16* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

template <int Hint = _MM_HINT_T0>
inline void Prefetch(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, static_cast<_mm_hint>(Hint));
}



// `rows` rows of D as float32: a float32 cache is read in place, a 16-bit one (or any
// under bf16_products) is widened (rounded) once into `scratch`, as every head of the
// unit reads them.
template <int D, typename T>
inline const float* Tile(const T* rows, int64_t count, bool bf16, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    if (!bf16) return rows;
  }
  for (int64_t i = 0; i < count * D; i += 16) {
    const __m512 x = Load16(rows + i);
    _mm512_store_ps(scratch + i, std::is_same_v<T, BF16> || !bf16 ? x : sgljax::RoundBf16(x));
  }
  return scratch;
}

// Prefetches `rows` rows of `row_bytes` from `p` (none if null), a row per call of `r`.
#define SGLJAX_PREFETCH_ROW(p, r, row_bytes)                                          \
  if (p)                                                                              \
    for (int64_t x_ = 0; x_ < (row_bytes); x_ += 64) _mm_prefetch((p) + (r) * (row_bytes) + x_, _MM_HINT_T1);

// Scores of HB heads of one token over a tile of `rows` keys (k: rows x D float32), keys
// [a, b) of it seen, and the online softmax's update: the running max m, denominator l
// and weighted sums acc (rescaled when the max rises); the tile's probabilities (0 for
// keys not seen, rounded to bf16 under bf16_products) go to p[h][16]. Prefetches the
// rows at `ahead` (a later page's tile) on the way.
template <typename TK>
inline __m512 LoadRounded(const TK* p, bool bf16) {  // 16 elements, to bf16 if asked
  const __m512 x = Load16(p);
  if constexpr (std::is_same_v<TK, BF16>) return x;
  return bf16 ? sgljax::RoundBf16(x) : x;
}

template <int C, int HB, bool Full = false, typename TK>
inline void Scores(const float* q, const TK* k, int64_t rows, int64_t a, int64_t b, bool round_k,
                   bool bf16, float* m, float* l, float* acc, float* p, const char* ahead,
                   int64_t row_bytes) {
  constexpr int D = 16 * C;
  if constexpr (Full) rows = 16;
  __m512 part[HB][16];
  {
    __m512 qv[HB][C];
    for (int h = 0; h < HB; ++h)
      for (int c = 0; c < C; ++c) qv[h][c] = _mm512_loadu_ps(q + h * D + c * 16);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 kv[C];
      for (int c = 0; c < C; ++c) kv[c] = LoadRounded(k + r * D + c * 16, round_k);
      SGLJAX_PREFETCH_ROW(ahead, r, row_bytes)
      for (int h = 0; h < HB; ++h) {
        __m512 x = _mm512_mul_ps(qv[h][0], kv[0]);
        for (int c = 1; c < C; ++c) x = _mm512_fmadd_ps(qv[h][c], kv[c], x);
        part[h][r] = x;
      }
    }
    if constexpr (!Full)
      for (int64_t r = rows; r < 16; ++r)
        for (int h = 0; h < HB; ++h) part[h][r] = _mm512_setzero_ps();
  }
  const __mmask16 seen = FirstLanes(b) & static_cast<__mmask16>(~FirstLanes(a));
  for (int h = 0; h < HB; ++h) {
    const __m512 s = SumRows16(part[h]);
    const float top = std::max(m[h], _mm512_mask_reduce_max_ps(seen, s));
    if (top > m[h]) {
      const float c = std::exp(m[h] - top);
      l[h] *= c;
      for (int i = 0; i < C; ++i)
        _mm512_storeu_ps(acc + h * D + i * 16,
                         _mm512_mul_ps(_mm512_loadu_ps(acc + h * D + i * 16), _mm512_set1_ps(c)));
      m[h] = top;
    }
    __m512 e = _mm512_maskz_mov_ps(seen, Exp16(_mm512_sub_ps(s, _mm512_set1_ps(top))));
    l[h] += _mm512_reduce_add_ps(e);
    if (bf16) e = sgljax::RoundBf16(e);
    _mm512_storeu_ps(p + h * 16, e);
  }
}

// acc[h] += sum over keys [a, b) of the tile of p[h][key] v[key], for HB heads.
template <int C, int HB, bool Full = false, typename TK>
inline void Values(const TK* v, int64_t a, int64_t b, bool bf16, const float* p, float* acc,
                   const char* ahead, int64_t row_bytes) {
  constexpr int D = 16 * C;
  if constexpr (Full) a = 0, b = 16;
  __m512 o[HB][C];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < C; ++c) o[h][c] = _mm512_loadu_ps(acc + h * D + c * 16);
  for (int64_t r = a; r < b; ++r) {
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = LoadRounded(v + r * D + c * 16, bf16);
    SGLJAX_PREFETCH_ROW(ahead, r - a, row_bytes)
    for (int h = 0; h < HB; ++h) {
      const __m512 w = _mm512_set1_ps(p[h * 16 + r]);
      for (int c = 0; c < C; ++c) o[h][c] = _mm512_fmadd_ps(w, vv[c], o[h][c]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + h * D + c * 16, o[h][c]);
}

// Calls F<C, n>::Run(offset, args...) over `count` consecutive heads in batches of n <= HB
// (HB heads keep q, k and their sums in registers).
template <int C>
constexpr int kHeadBatch = C >= 8 ? 2 : C >= 4 ? 4 : 8;

#define SGLJAX_BATCHES(call, batch)                                       \
  {                                                                       \
    constexpr int HB = batch;                                             \
    int64_t h = 0;                                                        \
    for (; h + HB <= count; h += HB) {                                    \
      call(HB);                                                           \
      ahead = nullptr;                                                    \
    }                                                                     \
    switch (count - h) {                                                  \
      case 1: if constexpr (1 < HB) call(1); break;                       \
      case 2: if constexpr (2 < HB) call(2); break;                       \
      case 3: if constexpr (3 < HB) call(3); break;                       \
      case 4: if constexpr (4 < HB) call(4); break;                       \
      case 5: if constexpr (5 < HB) call(5); break;                       \
      case 6: if constexpr (6 < HB) call(6); break;                       \
      case 7: if constexpr (7 < HB) call(7); break;                       \
      default: break;                                                     \
    }                                                                     \
  }

template <int C, typename TK>
inline void AllScores(int64_t count, const float* q, const TK* k, int64_t rows, int64_t a,
                      int64_t b, bool round_k, bool bf16, float* m, float* l, float* acc, float* p,
                      const char* ahead, int64_t row_bytes) {
  constexpr int D = 16 * C;
  const bool full = rows == 16 && a == 0 && b == 16;
#define SGLJAX_CALL(n)                                                                        \
  (full ? Scores<C, n, true>(q + h * D, k, rows, a, b, round_k, bf16, m + h, l + h, acc + h * D, \
                             p + h * 16, ahead, row_bytes)                                  \
        : Scores<C, n, false>(q + h * D, k, rows, a, b, round_k, bf16, m + h, l + h, acc + h * D, \
                              p + h * 16, ahead, row_bytes))
  SGLJAX_BATCHES(SGLJAX_CALL, kHeadBatch<C>)
#undef SGLJAX_CALL
}

template <int C, typename TK>
inline void AllValues(int64_t count, const TK* v, int64_t a, int64_t b, bool bf16, const float* p,
                      float* acc, const char* ahead, int64_t row_bytes) {
  constexpr int D = 16 * C;
  const bool full = a == 0 && b == 16;
#define SGLJAX_CALL(n)                                                                         \
  (full ? Values<C, n, true>(v, a, b, bf16, p + h * 16, acc + h * D, ahead, row_bytes)        \
        : Values<C, n, false>(v, a, b, bf16, p + h * 16, acc + h * D, ahead, row_bytes))
  SGLJAX_BATCHES(SGLJAX_CALL, kHeadBatch<C>)
#undef SGLJAX_CALL
}

// Prefetching (pages are scattered over the pool, so the hardware prefetcher stops at
// each page's end), measured at 64 decode tokens x 540 keys on a shared 2-core machine:
// for a float32 decode token, each tile asks for its rows of the next page into L1 and
// of the page kFar on into L2, as the per-head kernel before this one did (under a
// neighbour's load, spreading those over the rows was 20-40% slower); otherwise (16-bit
// rows, or prefill units, whose pages mostly come from L2 again) the rows of the page
// kAhead on go into L2 one row at a time, in the loops that read the current rows.
constexpr int64_t kAhead = 1, kFar = 4;

template <int C, typename T>
void RunUnitAvx(const Job& j, const Unit& u, Scratch& w) {
  constexpr int D = 16 * C;
  Begin(j, u, w);
  const int64_t ps = j.page_size, group = j.H / j.KV, n = u.n;
  const int64_t last = w.pos[n - 1], first = w.lo[0];  // keys the unit sees, at most
  const int64_t page_stride = j.KV * ps * D, row_bytes = D * int64_t{sizeof(T)};
  const T* kbase = static_cast<const T*>(j.k) + j.layer * j.num_pages * page_stride;
  const T* vbase = static_cast<const T*>(j.v) + j.layer * j.num_pages * page_stride;
  const int32_t* pages = j.table + u.s * j.table_width;
  const int64_t p0 = first / ps, p1 = last / ps, tiles = (ps + 15) / 16;
  w.p.resize(n * j.H * tiles * 16);
  // Rows are read straight from the cache (widened or rounded in registers) when one
  // batch of heads uses them, else widened once into scratch for all of them. A float32
  // cache needs neither without bf16_products.
  const bool direct = (std::is_same_v<T, float> && !j.bf16) || (n == 1 && group <= kHeadBatch<C>);
  const bool burst = std::is_same_v<T, float> && n == 1;  // see kFar
  for (int64_t p = p0; p <= p1 && p < p0 + kAhead; ++p) {  // the first pages, into L2
    Prefetch<_MM_HINT_T1>(kbase + pages[p] * page_stride, page_stride * int64_t{sizeof(T)});
    Prefetch<_MM_HINT_T1>(vbase + pages[p] * page_stride, page_stride * int64_t{sizeof(T)});
  }
  for (int64_t p = p0; p <= p1; ++p) {
    const bool fetch = p + kAhead <= p1;
    const T* kp = kbase + pages[p] * page_stride;
    const T* vp = vbase + pages[p] * page_stride;
    const T* kf = kbase + pages[std::min(p + kAhead, p1)] * page_stride;
    const T* vf = vbase + pages[std::min(p + kAhead, p1)] * page_stride;
    // Seen keys [a, b) of tile (kh, t) for token i of the unit (a >= b: none).
    auto range = [&](int64_t i, int64_t t, int64_t* a, int64_t* b) {
      const int64_t key0 = p * ps + t * 16;
      *a = std::max<int64_t>(0, w.lo[i] - key0);
      *b = std::min({int64_t{16}, ps - t * 16, w.pos[i] - key0 + 1});
    };
    // Each band of 16 keys of the page: pass 1 reads K of every kv head (scores and
    // probabilities), pass 2 V (the weighted sums).
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t key0 = p * ps + t * 16;
      if (key0 > last) break;
      const int64_t rows = std::min({int64_t{16}, ps - t * 16, last - key0 + 1});
      if (key0 + rows <= first) continue;
      for (int64_t kh = 0; kh < j.KV; ++kh) {
        const char* ahead = fetch ? reinterpret_cast<const char*>(kf + (kh * ps + t * 16) * D) : nullptr;
        if (burst) {
          ahead = nullptr;
          const int64_t at = (kh * ps + t * 16) * D;
          if (p + 1 <= p1) Prefetch<_MM_HINT_T0>(kbase + pages[p + 1] * page_stride + at, rows * row_bytes);
          if (p + kFar <= p1) Prefetch<_MM_HINT_T1>(kbase + pages[p + kFar] * page_stride + at, rows * row_bytes);
        }
        const T* kt = kp + (kh * ps + t * 16) * D;
        const float* k = direct ? nullptr : Tile<D>(kt, rows, j.bf16, w.kw);
        for (int64_t i = 0; i < n; ++i) {
          int64_t a, b;
          range(i, t, &a, &b);
          if (a >= b) continue;
          const int64_t x = i * j.H + kh * group;  // (token, first head of the group)
          float* pt = w.p.data() + (x * tiles + t * group) * 16;
          if (direct)
            AllScores<C>(group, w.q.data() + x * D, kt, rows, a, b, j.bf16, j.bf16, w.m.data() + x,
                         w.l.data() + x, w.acc.data() + x * D, pt, ahead, row_bytes);
          else
            AllScores<C>(group, w.q.data() + x * D, k, rows, a, b, false, j.bf16, w.m.data() + x,
                         w.l.data() + x, w.acc.data() + x * D, pt, ahead, row_bytes);
          ahead = nullptr;
        }
      }
      for (int64_t kh = 0; kh < j.KV; ++kh) {
        const char* ahead = fetch ? reinterpret_cast<const char*>(vf + (kh * ps + t * 16) * D) : nullptr;
        if (burst) {
          ahead = nullptr;
          const int64_t at = (kh * ps + t * 16) * D;
          if (p + 1 <= p1) Prefetch<_MM_HINT_T0>(vbase + pages[p + 1] * page_stride + at, rows * row_bytes);
          if (p + kFar <= p1) Prefetch<_MM_HINT_T1>(vbase + pages[p + kFar] * page_stride + at, rows * row_bytes);
        }
        const T* vt = vp + (kh * ps + t * 16) * D;
        const float* v = direct ? nullptr : Tile<D>(vt, rows, j.bf16, w.vw);
        for (int64_t i = 0; i < n; ++i) {
          int64_t a, b;
          range(i, t, &a, &b);
          if (a >= b) continue;
          const int64_t x = i * j.H + kh * group;
          const float* pt = w.p.data() + (x * tiles + t * group) * 16;
          if (direct)
            AllValues<C>(group, vt, a, b, j.bf16, pt, w.acc.data() + x * D, ahead, row_bytes);
          else
            AllValues<C>(group, v, a, b, false, pt, w.acc.data() + x * D, ahead, row_bytes);
          ahead = nullptr;
        }
      }
    }
  }
  Finish(j, u, w);
}
#endif

// Any head_dim and page size: scalar loops, one page of keys at a time.
template <typename T>
void RunUnitGeneric(const Job& j, const Unit& u, Scratch& w) {
  Begin(j, u, w);
  const int64_t ps = j.page_size, group = j.H / j.KV, n = u.n, D = j.D;
  const int64_t last = w.pos[n - 1], first = w.lo[0];
  const int64_t page_stride = j.KV * ps * D;
  const T* kbase = static_cast<const T*>(j.k) + j.layer * j.num_pages * page_stride;
  const T* vbase = static_cast<const T*>(j.v) + j.layer * j.num_pages * page_stride;
  const int32_t* pages = j.table + u.s * j.table_width;
  std::vector<float> k(ps * D), v(ps * D), sc(ps);
  for (int64_t p = first / ps; p <= last / ps; ++p) {
    const int64_t key0 = p * ps, rows = std::min(ps, last - key0 + 1);
    for (int64_t kh = 0; kh < j.KV; ++kh) {
      const T* kp = kbase + pages[p] * page_stride + kh * ps * D;
      const T* vp = vbase + pages[p] * page_stride + kh * ps * D;
      for (int64_t x = 0; x < rows * D; ++x) {
        k[x] = j.bf16 ? RoundBf16(ToFloat(kp[x])) : ToFloat(kp[x]);
        v[x] = j.bf16 ? RoundBf16(ToFloat(vp[x])) : ToFloat(vp[x]);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t a = std::max<int64_t>(0, w.lo[i] - key0);
        const int64_t b = std::min(rows, w.pos[i] - key0 + 1);
        if (a >= b) continue;
        auto seen = [&](int64_t r) {  // tree_bits: is key key0 + r visible to token i?
          const int64_t back = w.pos[i] - key0 - r;
          return back >= kTreeSpan || ((w.bits[i] >> back) & 1);
        };
        for (int64_t g = 0; g < group; ++g) {
          const int64_t x = i * j.H + kh * group + g;
          const float* q = w.q.data() + x * D;
          float top = w.m[x];
          for (int64_t r = a; r < b; ++r) {
            if (!seen(r)) continue;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += q[d] * k[r * D + d];
            sc[r] = dot;
            top = std::max(top, dot);
          }
          float* acc = w.acc.data() + x * D;
          if (top > w.m[x]) {
            const float c = std::exp(w.m[x] - top);
            w.l[x] *= c;
            for (int64_t d = 0; d < D; ++d) acc[d] *= c;
            w.m[x] = top;
          }
          for (int64_t r = a; r < b; ++r) {
            if (!seen(r)) continue;
            float e = std::exp(sc[r] - top);
            w.l[x] += e;
            if (j.bf16) e = RoundBf16(e);
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += e * v[r * D + d];
          }
        }
      }
    }
  }
  Finish(j, u, w);
}

template <typename T>
void RunUnit(const Job& j, const Unit& u, Scratch& w) {
  if (u.tree) return RunUnitGeneric<T>(j, u, w);
#if defined(__AVX512F__)
  if (j.D == 64) return RunUnitAvx<4, T>(j, u, w);
  if (j.D == 128) return RunUnitAvx<8, T>(j, u, w);
  if (j.D == 32) return RunUnitAvx<2, T>(j, u, w);
#endif
  RunUnitGeneric<T>(j, u, w);
}

template <typename T>
void Work(Job& j) {
  static thread_local Scratch scratch;
  const int64_t units = static_cast<int64_t>(j.units.size());
  for (int64_t u; (u = j.next.fetch_add(1)) < units;) {
    RunUnit<T>(j, j.units[u], scratch);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                          ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> kv_lens,
                          ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> tree_bits,
                          bool bf16_products, int64_t sliding_window,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto job = std::make_shared<Job>();
  if (auto err = sgljax::ReadPagedArgs("paged attention", q.dimensions(), k_cache, v_cache,
                                       layer, page_table, cu_q_lens, kv_lens, num_seqs, *job);
      !err.success()) {
    return err;
  }
  job->q = q.typed_data();
  job->out = out->typed_data();
  job->bf16 = bf16_products;
  job->window = std::max<int64_t>(0, sliding_window);
  if (tree_bits.element_count() != 0 && tree_bits.element_count() != job->T) {
    return ffi::Error::InvalidArgument("paged attention: tree_bits must be (T,) or (0,)");
  }
  job->tree_bits = tree_bits.element_count() ? tree_bits.typed_data() : nullptr;
  const int64_t HD = job->H * job->D;
  std::fill(job->out, job->out + job->RealBegin() * HD, 0.0f);  // padding tokens
  std::fill(job->out + job->RealEnd() * HD, job->out + job->T * HD, 0.0f);
  for (int64_t s = 0; s < job->num_seqs; ++s) {
    for (int64_t t0 = job->cu[s]; t0 < job->cu[s + 1]; t0 += kBlockTokens) {
      const int64_t n = std::min<int64_t>(kBlockTokens, job->cu[s + 1] - t0);
      const int64_t cost = n * (job->Pos(s, t0 + n - 1) + 1);
      bool tree = false;
      for (int64_t t = t0; job->tree_bits && t < t0 + n; ++t) tree |= job->tree_bits[t] != -1;
      job->units.push_back({s, t0, n, cost, tree});
    }
  }
  std::stable_sort(job->units.begin(), job->units.end(),
                   [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  const int64_t units = static_cast<int64_t>(job->units.size());
  if (units == 0) return ffi::Error::Success();
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
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tree_bits
                                  .Attr<bool>("bf16_products")
                                  .Attr<int64_t>("sliding_window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
