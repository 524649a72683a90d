// SIMD helpers shared by the CPU kernels (cpu_*.cc).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace sgljax {

// 16 vectors → one whose lane r is the sum of v[r]'s lanes (transpose-and-add tree).
inline __m512 SumRows16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),  // pairs of floats move
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));  // as one double
  }
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0b10001000),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0b11011101));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0b10001000),
                       _mm512_shuffle_f32x4(w[0], w[1], 0b11011101));
}

}  // namespace sgljax
#endif
