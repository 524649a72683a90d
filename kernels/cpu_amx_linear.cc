// bfloat16 matmul on Intel AMX for XLA CPU (an XLA FFI handler).
//
// y (N, M) float32 = W[layer] (N, K) bfloat16 @ bf16(x) (K, M), products summed in
// float32, where W holds every layer's weights stacked (L, N, K) and x is float32.
// This is what llama.cpp does with BF16 weights (activations rounded to bf16 at
// each matmul), on the tile unit instead of the vector unit: a prefill step's
// matmuls run several times faster than float32 FMAs, and decode steps read half
// the bytes. Inside the layer scan W[layer] is read in place (XLA CPU would copy
// the slice out first). kernels/cpu_amx_linear.py builds and registers it;
// tests/test_cpu_kernels.py checks it against a float64 reference.
//
// Tiles: A = 16 rows of W x 32 k (read in place, row stride K), B = 32 k x 16
// tokens of x in the "VNNI" layout (pairs of k side by side), C = 16 x 16 float32.
// A unit of work is 32 rows of W for every token: 2 A tiles x 2 B tiles -> 4 C tiles.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_amx.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(SGLJAX_HAVE_AMX)
namespace {

constexpr int64_t kRows = 32;  // rows of W per unit of work

struct Job {
  const uint16_t* w;  // W[layer], (N, K) bf16 bits
  std::vector<uint32_t> xp;  // x as bf16 pairs: [block of 16 tokens][K / 2][16]
  float* y;  // (N, M)
  int64_t N, K, M, blocks_m;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// x (K, M) float32 -> bf16 (round to nearest even), k pairs interleaved per token:
// xp[b][p][t] = bf16(x[2p][16b + t]) | bf16(x[2p + 1][16b + t]) << 16; tokens past M are 0.
// One block of 16 tokens.
void PackBlock(Job& j, const float* x, int64_t b) {
  const int64_t M = j.M, pairs = j.K / 2, t0 = b * 16, n = std::min<int64_t>(16, M - t0);
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  uint32_t* out = j.xp.data() + b * pairs * 16;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512 lo = _mm512_maskz_loadu_ps(mask, x + (2 * p) * M + t0);
    const __m512 hi = _mm512_maskz_loadu_ps(mask, x + (2 * p + 1) * M + t0);
    const __m512i lo16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
    const __m512i hi16 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
    _mm512_storeu_si512(out + p * 16, _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
  }
}

// Packing a prefill step's x is shared over the pool too (a decode step's few tokens
// are not worth the hand-off).
struct PackJob {
  std::shared_ptr<Job> j;  // a helper that starts late still holds what it reads
  const float* x;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};
constexpr int64_t kSharedPackBlocks = 8;

void PackWork(PackJob& p) {
  for (int64_t b; (b = p.next.fetch_add(1)) < p.j->blocks_m;) {
    PackBlock(*p.j, p.x, b);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

void PackX(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, const float* x) {
  job->xp.resize(job->blocks_m * (job->K / 2) * 16);  // every element is written
  if (job->blocks_m < kSharedPackBlocks) {
    for (int64_t b = 0; b < job->blocks_m; ++b) PackBlock(*job, x, b);
    return;
  }
  auto pack = std::make_shared<PackJob>();
  pack->j = job;
  pack->x = x;
  sgljax::ShareWork(pool, pack, job->blocks_m, PackWork);
}

// Writes a C tile (16 rows x 16 tokens; `store` names it, as tile numbers must be
// literals) to y at (row n, token block b).
template <typename Store>
void StoreC(const Job& j, int64_t n, int64_t b, float* scratch, Store store) {
  const int64_t t0 = b * 16;
  if (t0 + 16 <= j.M) {
    store(j.y + n * j.M + t0, j.M * sizeof(float));
    return;
  }
  store(scratch, 64);
  const int64_t cols = j.M - t0;
  for (int r = 0; r < 16; ++r) std::memcpy(j.y + (n + r) * j.M + t0, scratch + r * 16, cols * 4);
}

// Rows [n, n + 32) of y, every token. Tiles 0-3: C, 4-5: A, 6-7: B.
void RunUnit(const Job& j, int64_t n, float* scratch) {
  const int64_t K = j.K, chunks = K / 32, wstride = K * 2;
  const uint16_t* a0 = j.w + n * K;
  const uint16_t* a1 = a0 + 16 * K;
  for (int64_t b = 0; b < j.blocks_m; b += 2) {
    const bool two = b + 1 < j.blocks_m;
    const uint32_t* b0 = j.xp.data() + b * (K / 2) * 16;
    const uint32_t* b1 = b0 + (K / 2) * 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(4, a0 + c * 32, wstride);
      _tile_loadd(5, a1 + c * 32, wstride);
      _tile_loadd(6, b0 + c * 16 * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, b1 + c * 16 * 16, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    StoreC(j, n, b, scratch, [](float* p, int64_t s) { _tile_stored(0, p, s); });
    StoreC(j, n + 16, b, scratch, [](float* p, int64_t s) { _tile_stored(2, p, s); });
    if (two) {
      StoreC(j, n, b + 1, scratch, [](float* p, int64_t s) { _tile_stored(1, p, s); });
      StoreC(j, n + 16, b + 1, scratch, [](float* p, int64_t s) { _tile_stored(3, p, s); });
    }
  }
}

void Work(Job& j) {
  sgljax::ConfigureTiles();
  alignas(64) float scratch[16 * 16];
  const int64_t units = j.N / kRows;
  for (int64_t u; (u = j.next.fetch_add(1)) < units;) {
    RunUnit(j, u * kRows, scratch);
    j.done.fetch_add(1, std::memory_order_release);
  }
  _tile_release();
}

ffi::Error AmxLinear(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions(), xd = x.dimensions();
  if (wd.size() != 3 || xd.size() != 2 || wd[2] != xd[0]) {
    return ffi::Error::InvalidArgument("amx linear: W must be (L, N, K) and x (K, M)");
  }
  if (wd[1] % kRows != 0 || wd[2] % 32 != 0) {
    return ffi::Error::InvalidArgument("amx linear: N must be a multiple of 32 and K of 32");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("amx linear: layer out of range");
  auto job = std::make_shared<Job>();
  job->N = wd[1];
  job->K = wd[2];
  job->M = xd[1];
  job->blocks_m = (job->M + 15) / 16;
  job->w = reinterpret_cast<const uint16_t*>(w.typed_data()) + l * job->N * job->K;
  job->y = y->typed_data();
  PackX(pool, job, x.typed_data());
  const int64_t units = job->N / kRows;
  sgljax::ShareWork(pool, job, units, Work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SgljaxAmxLinear, AmxLinear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // W (L, N, K)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (K, M)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (N, M)

extern "C" int SgljaxAmxLinearSupported() { return sgljax::AmxUsable(); }
#else
extern "C" int SgljaxAmxLinearSupported() { return 0; }
#endif
