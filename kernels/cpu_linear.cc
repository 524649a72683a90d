// Skinny matmul for decode steps on XLA CPU (an XLA FFI handler, AVX-512).
//
// y (N, M) = W[layer] (N, K) @ x (K, M), float32, where W holds every layer's weights
// stacked (L, N, K) and M is a decode step's few tokens. Why it exists: inside the
// layer scan, XLA CPU copies each layer's weight slice out of the stacked array
// before its dot, and its dots on a few columns run well below memory speed. This
// kernel reads W[layer] in place, once, in blocks of rows split over the thread pool.
// kernels/cpu_linear.py builds and registers it; tests/test_cpu_linear.py checks it
// against numpy.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_simd.h"
#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

using sgljax::SumRows16;

constexpr int64_t kBlockRows = 32;  // rows of W per unit of work handed to a thread

struct Job {
  const float* w;  // W[layer], (N, K)
  const float* x = nullptr;  // x itself, (K, M), when M >= 16 (RunBlockWide)
  std::vector<float> xt;  // else x transposed to (Mp, K), tokens padded to a multiple of 4 with 0
  float* y;  // (N, M)
  int64_t N, K, M, Mp;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Rows [n0, n1) of y: 4 rows x 4 tokens at a time, 16 accumulators, K in chunks of 16
// (the last one masked).
void RunBlock(const Job& j, int64_t n0, int64_t n1) {
  const int64_t K = j.K, chunks = (K + 15) / 16;
  const __mmask16 tail = K % 16 ? static_cast<__mmask16>((1u << (K % 16)) - 1) : 0xFFFF;
  alignas(64) float sums[16];
  for (int64_t n = n0; n < n1; n += 4) {
    const float* wr[4];
    for (int i = 0; i < 4; ++i) wr[i] = j.w + std::min(n + i, j.N - 1) * K;  // tail rows: reread the last
    for (int64_t m = 0; m < j.Mp; m += 4) {
      const float* xr[4];
      for (int t = 0; t < 4; ++t) xr[t] = j.xt.data() + (m + t) * K;
      __m512 acc[16];
      for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __mmask16 mask = c + 1 == chunks ? tail : 0xFFFF;
        __m512 wv[4], xv[4];
        for (int i = 0; i < 4; ++i) wv[i] = _mm512_maskz_loadu_ps(mask, wr[i] + c * 16);
        for (int t = 0; t < 4; ++t) xv[t] = _mm512_maskz_loadu_ps(mask, xr[t] + c * 16);
        for (int i = 0; i < 4; ++i)
          for (int t = 0; t < 4; ++t) acc[i * 4 + t] = _mm512_fmadd_ps(wv[i], xv[t], acc[i * 4 + t]);
      }
      _mm512_store_ps(sums, SumRows16(acc));
      for (int i = 0; i < 4 && n + i < j.N; ++i)
        for (int t = 0; t < 4 && m + t < j.M; ++t) j.y[(n + i) * j.M + m + t] = sums[i * 4 + t];
    }
  }
}

// Rows [n0, n1) of y for 16 or more tokens, R rows x T vectors of 16 tokens at a time
// (R * T = 16 accumulators), fed by broadcasts of W; no reductions. More token vectors
// per row means fewer loads per multiply-add: 16x1 for 16 tokens, 8x2 for 32, 4x4 for 64.
template <int R, int T>
void RunBlockWide(const Job& j, const float* x, int64_t n0, int64_t n1) {
  const int64_t K = j.K, M = j.M;
  auto mask_at = [M](int64_t m) -> __mmask16 {
    if (m >= M) return 0;
    return M - m >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (M - m)) - 1);
  };
  for (int64_t n = n0; n < n1; n += R) {
    const float* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = j.w + std::min(n + r, n1 - 1) * K;  // tail: reread
    for (int64_t m = 0; m < M; m += 16 * T) {
      __mmask16 mask[T];
      for (int t = 0; t < T; ++t) mask[t] = mask_at(m + 16 * t);
      __m512 acc[R * T];
      for (int a = 0; a < R * T; ++a) acc[a] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        __m512 xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(mask[t], x + k * M + m + 16 * t);
        for (int r = 0; r < R; ++r) {
          const __m512 wv = _mm512_set1_ps(wr[r][k]);
          for (int t = 0; t < T; ++t) acc[r * T + t] = _mm512_fmadd_ps(wv, xv[t], acc[r * T + t]);
        }
      }
      for (int r = 0; r < R && n + r < n1; ++r)
        for (int t = 0; t < T; ++t)
          _mm512_mask_storeu_ps(j.y + (n + r) * M + m + 16 * t, mask[t], acc[r * T + t]);
    }
  }
}

void Work(Job& j) {
  const int64_t blocks = (j.N + kBlockRows - 1) / kBlockRows;
  for (int64_t b; (b = j.next.fetch_add(1)) < blocks;) {
    const int64_t n0 = b * kBlockRows, n1 = std::min(j.N, (b + 1) * kBlockRows);
    if (j.x == nullptr)
      RunBlock(j, n0, n1);
    else if (j.M >= 64)
      RunBlockWide<4, 4>(j, j.x, n0, n1);
    else if (j.M >= 32)
      RunBlockWide<8, 2>(j, j.x, n0, n1);
    else
      RunBlockWide<16, 1>(j, j.x, n0, n1);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                  ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions(), xd = x.dimensions();
  if (wd.size() != 3 || xd.size() != 2 || wd[2] != xd[0]) {
    return ffi::Error::InvalidArgument("linear: W must be (L, N, K) and x (K, M)");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("linear: layer out of range");
  auto job = std::make_shared<Job>();
  job->N = wd[1];
  job->K = wd[2];
  job->M = xd[1];
  job->Mp = (job->M + 3) / 4 * 4;
  job->w = w.typed_data() + l * job->N * job->K;
  job->y = y->typed_data();
  const float* xs = x.typed_data();
  if (job->M >= 16) {
    job->x = xs;
  } else {
    job->xt.assign(job->Mp * job->K, 0.0f);
    for (int64_t k = 0; k < job->K; ++k)
      for (int64_t m = 0; m < job->M; ++m) job->xt[m * job->K + k] = xs[k * job->M + m];
  }
  const int64_t blocks = (job->N + kBlockRows - 1) / kBlockRows;
  sgljax::ShareWork(pool, job, blocks, Work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SgljaxLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W (L, N, K)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (K, M)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (N, M)

extern "C" int SgljaxLinearSupported() { return 1; }
#else
extern "C" int SgljaxLinearSupported() { return 0; }
#endif
