// Intel AMX helpers shared by the tile-unit kernels (cpu_amx_*.cc).
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define SGLJAX_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace sgljax {

// The LDTILECFG operand (palette 1): every tile used here is 16 rows x 64 bytes.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures tiles 0-7 as 16 x 64 bytes on this thread (tile state is per thread);
// pair with _tile_release() when the thread's work is done.
inline void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// The CPU has AMX-BF16 and Linux lets this process use the tile registers (they are
// off until asked for: ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
inline bool AmxUsable() {
  if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

// float32 -> bfloat16 bits, round to nearest even (as _mm512_cvtneps_pbh does).
inline uint16_t Bf16Bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace sgljax
#endif
