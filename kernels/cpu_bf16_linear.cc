// bfloat16 matmul for decode steps on CPUs with AVX512-BF16 but no AMX (an XLA FFI handler).
//
// y (N, M) = W[layer] (N, K) @ bf16(x) (K, M): W bfloat16, stacked (L, N, K); x float32,
// rounded to bfloat16 (nearest even) at the matmul; products summed in float32 by
// vdpbf16ps (two products a lane an instruction). The numerics of engine/weight_forms.py's
// dense() and of the AMX kernel, at half the bytes of a float32 model. Why it exists: on
// such CPUs (AMD Zen 4, Intel Cooper Lake) XLA's bfloat16 dots run several times slower
// than float32 ones, a decode step most of all. W[layer] is read in place, once, in blocks
// of rows split over the thread pool; x is transposed to (M, K) bfloat16 pairs first.
// kernels/cpu_bf16_linear.py builds and registers it; tests/test_cpu_kernels.py checks it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_pool.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

using sgljax::SumRows16;

constexpr int64_t kBlockRows = 32;  // rows of W per unit of work handed to a thread

struct Job {
  const uint16_t* w;  // W[layer], (N, K) bfloat16 bits
  std::vector<uint16_t> xt;  // x transposed to (Mp, Kp) bfloat16, padded with zeros
  float* y;  // (N, M)
  int64_t N, K, Kp, M, Mp;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline uint16_t ToBf16(float f) {  // nearest even (inputs are finite activations)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// Rows [n0, n1) of y: 4 rows x 4 tokens at a time, 16 accumulators, K in chunks of 32
// bfloat16 (the last one masked: W's rows are not padded).
void RunBlock(const Job& j, int64_t n0, int64_t n1) {
  const int64_t K = j.K, chunks = j.Kp / 32;
  const int64_t rest = K - (chunks - 1) * 32;
  const __mmask32 tail = rest == 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << rest) - 1);
  alignas(64) float sums[16];
  for (int64_t n = n0; n < n1; n += 4) {
    const uint16_t* wr[4];
    for (int i = 0; i < 4; ++i) wr[i] = j.w + std::min(n + i, n1 - 1) * K;  // tail: reread
    for (int64_t m = 0; m < j.Mp; m += 4) {
      const uint16_t* xr[4];
      for (int t = 0; t < 4; ++t) xr[t] = j.xt.data() + (m + t) * j.Kp;
      __m512 acc[16];
      for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __mmask32 mask = c + 1 == chunks ? tail : 0xFFFFFFFFu;
        __m512bh wv[4], xv[4];
        for (int i = 0; i < 4; ++i)
          wv[i] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[i] + c * 32);
        for (int t = 0; t < 4; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(xr[t] + c * 32);
        for (int i = 0; i < 4; ++i)
          for (int t = 0; t < 4; ++t) acc[i * 4 + t] = _mm512_dpbf16_ps(acc[i * 4 + t], wv[i], xv[t]);
      }
      _mm512_store_ps(sums, SumRows16(acc));
      for (int i = 0; i < 4 && n + i < n1; ++i)
        for (int t = 0; t < 4 && m + t < j.M; ++t) j.y[(n + i) * j.M + m + t] = sums[i * 4 + t];
    }
  }
}

void Work(Job& j) {
  const int64_t blocks = (j.N + kBlockRows - 1) / kBlockRows;
  for (int64_t b; (b = j.next.fetch_add(1)) < blocks;) {
    RunBlock(j, b * kBlockRows, std::min(j.N, (b + 1) * kBlockRows));
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> layer,
                  ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions(), xd = x.dimensions();
  if (wd.size() != 3 || xd.size() != 2 || wd[2] != xd[0]) {
    return ffi::Error::InvalidArgument("bf16 linear: W must be (L, N, K) and x (K, M)");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("bf16 linear: layer out of range");
  auto job = std::make_shared<Job>();
  job->N = wd[1];
  job->K = wd[2];
  job->Kp = (job->K + 31) / 32 * 32;
  job->M = xd[1];
  job->Mp = (job->M + 3) / 4 * 4;
  job->w = reinterpret_cast<const uint16_t*>(w.typed_data()) + l * job->N * job->K;
  job->y = y->typed_data();
  const float* xs = x.typed_data();
  job->xt.assign(job->Mp * job->Kp, 0);
  for (int64_t k = 0; k < job->K; ++k)
    for (int64_t m = 0; m < job->M; ++m) job->xt[m * job->Kp + k] = ToBf16(xs[k * job->M + m]);
  const int64_t blocks = (job->N + kBlockRows - 1) / kBlockRows;
  sgljax::ShareWork(pool, job, blocks, Work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SgljaxBf16Linear, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // W (L, N, K)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (K, M)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (N, M)

extern "C" int SgljaxBf16LinearSupported() { return 1; }
#else
extern "C" int SgljaxBf16LinearSupported() { return 0; }
#endif
