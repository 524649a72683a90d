// Attention of prefill chunks over the paged KV cache, on Intel AMX (an XLA FFI handler).
//
// Why it exists: a prefill chunk asks Q x H queries to attend over everything before
// them; cpu_paged_attention.cc does that one query at a time on the vector unit. Here
// the chunk's queries of one kv head are a matrix, and both products run on the tile
// unit: S = Q K^T and O = P V, in bfloat16 with float32 sums, as on a TPU with bf16
// models. 8 sequences x 64 queries over 1,088 cached tokens (f16 cache, SmolLM2's
// heads, benchmarks/attention_kernels.py): 3.3 ms a layer here, 15.5 on the vector unit.
//
// Numerics (kernels/cpu_amx_attention.py has the pure-JAX reference): q, k and v are
// rounded to bfloat16; scores are summed in float32 and scaled by 1/sqrt(D); each row's
// probabilities exp(s - max) are taken in float32, summed in float32 for the
// denominator, and rounded to bfloat16 for P V, whose float32 sums are divided by it.
//
// Layouts: the ragged step of kernels/paged_attention.py (kernels/cpu_paged.h): q (T, H,
// D) float32 or bfloat16; caches (L, pages, KV, page_size, D) float32, float16 or
// bfloat16; page_table (S, P); cu_q_lens (S + 1,); kv_lens (S,); num_seqs (); out (T, H,
// D) float32. Query token t of sequence s sits at position kv_lens[s] - q_len + (t -
// cu_q_lens[s]) and sees the keys up to it; tokens of no sequence get zeros.
// The rows of one (sequence, kv head) are its (query token, head of the group) pairs,
// token-major. A unit of work is up to 256 of them: K and V are packed once for the
// unit, for all the keys its latest row sees; then each group of 64 rows (4 row tiles)
// takes its scores, softmax and weighted sum, over the keys that group sees.
//
// Packed, in thread-local scratch: Q as A tiles (16 rows x 32 dims); K^T as B tiles
// (32 dims x 16 keys, pairs of dims side by side: a 16 x 16 dword transpose of 16 key
// rows); V as B tiles (32 keys x 16 dims, pairs of consecutive keys side by side); a
// group's scores S (float32) and probabilities P (bfloat16, A tiles of 16 rows x 32 keys).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_amx.h"
#include "cpu_paged.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(SGLJAX_HAVE_AMX)
namespace {

constexpr int64_t kUnitRows = 256;  // query rows per unit: K and V are packed once for them
constexpr int64_t kGroupRows = 64;  // rows whose scores are taken together: tiles 0-3

using sgljax::BF16;
using sgljax::F16;

struct UnitId {
  int64_t s, kh, r0;  // rows [r0, r0 + kUnitRows) of (sequence s, kv head kh)
};

struct Job : sgljax::PagedArgs {  // the caches' element type is the T of Work<TQ, T>
  const void* q;  // TQ
  float* out;
  int64_t group;
  std::vector<UnitId> units;  // rows of one (sequence, kv head): q_len * group
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// 32 elements -> 32 bfloat16 (round to nearest even) in one vector.
inline __m512i Load32(const float* p) {
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
}
inline __m512i Load32(const F16* p) {
  const __m256i* h = reinterpret_cast<const __m256i*>(p);
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_cvtph_ps(_mm256_loadu_si256(h + 1)),
                                      _mm512_cvtph_ps(_mm256_loadu_si256(h)));
}
inline __m512i Load32(const BF16* p) { return _mm512_loadu_si512(p); }

// 16 elements -> 16 bfloat16, each widened to the low half of a dword.
inline __m512i Load16Low(const float* p) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
}
inline __m512i Load16Low(const F16* p) {
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f));
}
inline __m512i Load16Low(const BF16* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// r[i] lane j -> r[j] lane i, for 16 vectors of 16 dwords.
inline void Transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + k], 128-bit lane L: column 4L + k of rows 4g .. 4g + 3.
  for (int g = 0; g < 4; ++g) {
    const __m512i* a = t + 4 * g;
    u[4 * g + 0] = _mm512_unpacklo_epi64(a[0], a[2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(a[0], a[2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(a[1], a[3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(a[1], a[3]);
  }
  for (int k = 0; k < 4; ++k) {  // gather lane L of u[k], u[4 + k], u[8 + k], u[12 + k]
    const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0b01000100);
    const __m512i v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0b11101110);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0b01000100);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0b11101110);
    r[k] = _mm512_shuffle_i32x4(v0, v2, 0b10001000);
    r[4 + k] = _mm512_shuffle_i32x4(v0, v2, 0b11011101);
    r[8 + k] = _mm512_shuffle_i32x4(v1, v3, 0b10001000);
    r[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0b11011101);
  }
}

// Tile numbers must be literals: tiles 0-3 accumulate, 4 holds A, 6 holds B.
inline void ZeroC(int c) {
  switch (c) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
  }
}
inline void DotIntoC(int c) {  // C[c] += A(4) . B(6)
  switch (c) {
    case 0: _tile_dpbf16ps(0, 4, 6); break;
    case 1: _tile_dpbf16ps(1, 4, 6); break;
    case 2: _tile_dpbf16ps(2, 4, 6); break;
    default: _tile_dpbf16ps(3, 4, 6); break;
  }
}
inline void StoreC(int c, void* p, int64_t stride) {
  switch (c) {
    case 0: _tile_stored(0, p, stride); break;
    case 1: _tile_stored(1, p, stride); break;
    case 2: _tile_stored(2, p, stride); break;
    default: _tile_stored(3, p, stride); break;
  }
}

struct Scratch {
  std::vector<uint16_t> qp;  // [row tile][D / 32][16][32] bf16
  std::vector<uint32_t> kt;  // [16-key block][D / 32][16 dim pairs][16 keys]
  std::vector<uint32_t> vp;  // [key pair][D]
  std::vector<float> s;  // [rows][n32]
  std::vector<uint16_t> p;  // [rows][n32] bf16
  alignas(64) float rowmax[kGroupRows][16];  // running max over the keys a row sees, per lane
  alignas(64) float c[16 * 16];
};

// exp(x) for x <= 0 (a softmax's exponents), 16 lanes: 2^n e^r with r = x - n ln 2,
// e^r by its degree-6 Taylor polynomial (|r| <= ln 2 / 2: under 2 float32 ulps), and
// the 2^n by scalef, which flushes very negative x to 0.
inline __m512 ExpNonPositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);  // and the rest
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 FirstLanes(int64_t count) {  // lanes [0, count) of 16
  return count >= 16 ? 0xffff : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1);
}

template <typename T>
const T* Row(const Job& j, const int32_t* pages, int64_t kh, int64_t t, const void* cache) {
  const int64_t page_stride = j.KV * j.page_size * j.D;
  return static_cast<const T*>(cache) + (j.layer * j.num_pages + pages[t / j.page_size]) *
      page_stride + (kh * j.page_size + t % j.page_size) * j.D;
}

// The unit's view of one (sequence, kv head): rows [r0, r0 + nr) and what they see.
struct Unit {
  int64_t s, kh, r0, nr, nrt, n, n32;
  int64_t g0, gr, grt, gn32;  // the group of rows in hand: [g0, g0 + gr), its tiles, its keys
  int64_t seen[kUnitRows];  // keys each row sees
  const int32_t* pages;
  int64_t Token(int64_t r, const Job& j) const { return j.cu[s] + (r0 + r) / j.group; }
  int64_t Head(int64_t r, const Job& j) const { return kh * j.group + (r0 + r) % j.group; }
};

template <typename TQ>
void PackQ(const Job& j, const Unit& u, Scratch& w) {  // A tiles; rows past nr are zero
  const int64_t C = j.D / 32;
  w.qp.assign(u.nrt * C * 512, 0);
  for (int64_t r = 0; r < u.nr; ++r) {
    const TQ* q = static_cast<const TQ*>(j.q) + (u.Token(r, j) * j.H + u.Head(r, j)) * j.D;
    for (int64_t c = 0; c < C; ++c)
      _mm512_storeu_si512(w.qp.data() + ((r / 16 * C + c) * 16 + r % 16) * 32, Load32(q + c * 32));
  }
}

template <typename T>
void PackKV(const Job& j, const Unit& u, Scratch& w) {  // B tiles; keys past n are zero
  const int64_t C = j.D / 32, D = j.D;
  w.kt.resize(u.n32 / 16 * C * 256);
  for (int64_t kb = 0; kb < u.n32 / 16; ++kb) {
    const T* rows[16];
    for (int t = 0; t < 16; ++t)
      rows[t] = kb * 16 + t < u.n ? Row<T>(j, u.pages, u.kh, kb * 16 + t, j.k) : nullptr;
    for (int t = 0; t < 16 && (kb + 1) * 16 + t < u.n; ++t) {  // the next block's rows
      const char* next = reinterpret_cast<const char*>(Row<T>(j, u.pages, u.kh, (kb + 1) * 16 + t, j.k));
      for (int64_t b = 0; b < j.D * int64_t{sizeof(T)}; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    }
    for (int64_t c = 0; c < C; ++c) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t) r[t] = rows[t] ? Load32(rows[t] + c * 32) : _mm512_setzero_si512();
      Transpose16(r);
      uint32_t* dst = w.kt.data() + (kb * C + c) * 256;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * 16, r[p]);
    }
  }
  // Dword d of key pair p is (v[2p][d], v[2p + 1][d]).
  w.vp.resize(u.n32 / 2 * D);
  for (int64_t p = 0; p < u.n32 / 2; ++p) {
    const T* lo = 2 * p < u.n ? Row<T>(j, u.pages, u.kh, 2 * p, j.v) : nullptr;
    const T* hi = 2 * p + 1 < u.n ? Row<T>(j, u.pages, u.kh, 2 * p + 1, j.v) : nullptr;
    if (2 * p + 17 < u.n) {  // 8 pairs ahead
      for (int k = 16; k < 18; ++k) {
        const char* next = reinterpret_cast<const char*>(Row<T>(j, u.pages, u.kh, 2 * p + k, j.v));
        for (int64_t b = 0; b < j.D * int64_t{sizeof(T)}; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      }
    }
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i a = lo ? Load16Low(lo + d) : _mm512_setzero_si512();
      const __m512i c = hi ? Load16Low(hi + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(w.vp.data() + p * D + d, _mm512_or_si512(a, _mm512_slli_epi32(c, 16)));
    }
  }
}

// S = Q K^T for the group's (up to 4) row tiles, a 16-key column at a time; each stored
// tile updates its rows' running max (over the keys they see) while it is in L1.
void Scores(const Job& j, const Unit& u, Scratch& w) {
  const int64_t C = j.D / 32, n32 = u.gn32, tiles = u.grt, rt0 = u.g0 / 16;
  w.s.resize(kGroupRows * n32);
  for (int64_t r = 0; r < u.gr; ++r) _mm512_store_ps(w.rowmax[r], _mm512_set1_ps(-INFINITY));
  for (int64_t kb = 0; kb < n32 / 16; ++kb) {
    for (int64_t t = 0; t < tiles; ++t) ZeroC(t);
    for (int64_t c = 0; c < C; ++c) {
      _tile_loadd(6, w.kt.data() + (kb * C + c) * 256, 64);
      for (int64_t t = 0; t < tiles; ++t) {
        _tile_loadd(4, w.qp.data() + ((rt0 + t) * C + c) * 512, 64);
        DotIntoC(t);
      }
    }
    for (int64_t t = 0; t < tiles; ++t) {
      float* dst = w.s.data() + t * 16 * n32 + kb * 16;
      StoreC(t, dst, n32 * 4);
      for (int64_t rr = 0; rr < 16 && t * 16 + rr < u.gr; ++rr) {
        const int64_t r = t * 16 + rr;  // row of the group
        const __mmask16 seen = FirstLanes(u.seen[u.g0 + r] - kb * 16);
        const __m512 m = _mm512_load_ps(w.rowmax[r]);
        _mm512_store_ps(w.rowmax[r], _mm512_mask_max_ps(m, seen, m, _mm512_loadu_ps(dst + rr * n32)));
      }
    }
  }
}

// P = bf16(exp((s - max) * scale)) over the keys a row sees, 0 past them (and in pad
// rows); returns each row's 1 / sum of the float32 exps (0 for a row that sees nothing).
void Softmax(const Job& j, const Unit& u, Scratch& w, float* inv_sum) {
  const int64_t n32 = u.gn32;
  w.p.resize(kGroupRows * n32);
  std::fill(w.p.begin() + u.gr * n32, w.p.begin() + u.grt * 16 * n32, 0);
  const __m512 scale = _mm512_set1_ps(j.scale);
  for (int64_t r = 0; r < u.gr; ++r) {
    const int64_t seen_r = u.seen[u.g0 + r];
    const float* sr = w.s.data() + r * n32;
    uint16_t* pr = w.p.data() + r * n32;
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_load_ps(w.rowmax[r])));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n32; t += 16) {
      const __mmask16 seen = FirstLanes(seen_r - t);
      const __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(seen, sr + t), top), scale);
      const __m512 e = _mm512_maskz_mov_ps(seen, ExpNonPositive(x));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + t), (__m256i)_mm512_cvtneps_pbh(e));
    }
    inv_sum[r] = seen_r > 0 ? 1.0f / _mm512_reduce_add_ps(sum) : 0.0f;
  }
}

// O = P V, 4 dim tiles of 16 at a time; rows scaled by 1 / sum as they are written.
void Weighted(const Job& j, const Unit& u, Scratch& w, const float* inv_sum) {
  const int64_t D = j.D, n32 = u.gn32;
  for (int64_t t = 0; t < u.grt; ++t) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t nd = std::min<int64_t>(4, (D - d0) / 16);
      for (int64_t c = 0; c < nd; ++c) ZeroC(c);
      for (int64_t kb = 0; kb < n32 / 32; ++kb) {
        _tile_loadd(4, w.p.data() + t * 16 * n32 + kb * 32, n32 * 2);
        for (int64_t c = 0; c < nd; ++c) {
          _tile_loadd(6, w.vp.data() + kb * 16 * D + d0 + c * 16, D * 4);
          DotIntoC(c);
        }
      }
      for (int64_t c = 0; c < nd; ++c) {
        StoreC(c, w.c, 64);
        for (int64_t rr = 0; rr < 16 && t * 16 + rr < u.gr; ++rr) {
          const int64_t r = u.g0 + t * 16 + rr;  // row of the unit
          float* out = j.out + (u.Token(r, j) * j.H + u.Head(r, j)) * D;
          _mm512_storeu_ps(out + d0 + c * 16, _mm512_mul_ps(_mm512_loadu_ps(w.c + rr * 16),
                                                            _mm512_set1_ps(inv_sum[t * 16 + rr])));
        }
      }
    }
  }
}

template <typename TQ, typename T>
void RunUnit(const Job& j, int64_t index, Scratch& w) {
  Unit u;
  const UnitId& id = j.units[index];
  u.kh = id.kh;
  u.s = id.s;
  u.r0 = id.r0;
  u.nr = std::min(kUnitRows, j.QLen(u.s) * j.group - u.r0);
  u.nrt = (u.nr + 15) / 16;
  u.pages = j.table + u.s * j.table_width;
  u.n = 0;
  for (int64_t r = 0; r < u.nr; ++r) {
    const int64_t pos = j.Pos(u.s, u.Token(r, j));
    u.seen[r] = std::max<int64_t>(0, std::min<int64_t>(j.kv_lens[u.s], pos + 1));
    u.n = std::max(u.n, u.seen[r]);
  }
  if (u.n == 0) {
    for (int64_t r = 0; r < u.nr; ++r) {
      float* out = j.out + (u.Token(r, j) * j.H + u.Head(r, j)) * j.D;
      std::fill(out, out + j.D, 0.0f);
    }
    return;
  }
  u.n32 = (u.n + 31) / 32 * 32;
  PackQ<TQ>(j, u, w);
  PackKV<T>(j, u, w);
  float inv_sum[kGroupRows];
  for (u.g0 = 0; u.g0 < u.nr; u.g0 += kGroupRows) {
    u.gr = std::min(kGroupRows, u.nr - u.g0);
    u.grt = (u.gr + 15) / 16;
    int64_t gn = 0;  // keys the group sees: fewer than the unit's in a causal chunk
    for (int64_t r = u.g0; r < u.g0 + u.gr; ++r) gn = std::max(gn, u.seen[r]);
    u.gn32 = (gn + 31) / 32 * 32;
    if (gn == 0) {
      for (int64_t r = u.g0; r < u.g0 + u.gr; ++r) {
        float* out = j.out + (u.Token(r, j) * j.H + u.Head(r, j)) * j.D;
        std::fill(out, out + j.D, 0.0f);
      }
      continue;
    }
    Scores(j, u, w);
    Softmax(j, u, w, inv_sum);
    Weighted(j, u, w, inv_sum);
  }
}

template <typename TQ, typename T>
void Work(Job& j) {
  static thread_local Scratch scratch;
  sgljax::ConfigureTiles();
  const int64_t units = static_cast<int64_t>(j.units.size());
  for (int64_t u; (u = j.next.fetch_add(1)) < units;) {
    RunUnit<TQ, T>(j, u, scratch);
    j.done.fetch_add(1, std::memory_order_release);
  }
  _tile_release();
}

ffi::Error AmxAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                        ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> layer,
                        ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> cu_q_lens,
                        ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> num_seqs,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto job = std::make_shared<Job>();
  if (auto err = sgljax::ReadPagedArgs("amx attention", q.dimensions(), k_cache, v_cache,
                                       layer, page_table, cu_q_lens, kv_lens, num_seqs, *job);
      !err.success()) {
    return err;
  }
  if (job->D % 32 != 0) {
    return ffi::Error::InvalidArgument("amx attention: head_dim must be a multiple of 32");
  }
  if (q.element_type() != ffi::F32 && q.element_type() != ffi::BF16) {
    return ffi::Error::InvalidArgument("amx attention: q must be f32 or bf16");
  }
  job->q = q.untyped_data();
  job->out = out->typed_data();
  job->group = job->H / job->KV;
  const int64_t HD = job->H * job->D;
  std::fill(job->out, job->out + job->RealBegin() * HD, 0.0f);  // padding tokens
  std::fill(job->out + job->RealEnd() * HD, job->out + job->T * HD, 0.0f);
  for (int64_t s = 0; s < job->num_seqs; ++s) {
    const int64_t rows = job->QLen(s) * job->group;
    for (int64_t kh = 0; kh < job->KV; ++kh)
      for (int64_t r0 = 0; r0 < rows; r0 += kUnitRows) job->units.push_back({s, kh, r0});
  }
  const int64_t units = static_cast<int64_t>(job->units.size());
  if (units == 0) return ffi::Error::Success();
  sgljax::WithCacheType(job->kv_type, [&](auto element) {
    using T = decltype(element);
    if (q.element_type() == ffi::BF16)
      sgljax::ShareWork(pool, job, units, Work<BF16, T>);
    else
      sgljax::ShareWork(pool, job, units, Work<float, T>);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SgljaxAmxAttention, AmxAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int SgljaxAmxAttentionSupported() { return sgljax::AmxUsable(); }
#else
extern "C" int SgljaxAmxAttentionSupported() { return 0; }
#endif
