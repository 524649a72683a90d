// What the CPU attention kernels (cpu_paged_attention.cc, cpu_amx_attention.cc) share:
// the paged KV cache's arguments, checked before any row is read, and its element types.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace sgljax {

// The cache's 16-bit element types, kept as their bits.
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

// Calls f(T{}) with T the element type of a cache of type t (checked by ReadPagedArgs).
template <typename F>
void WithCacheType(xla::ffi::DataType t, F f) {
  if (t == xla::ffi::F16)
    f(F16{});
  else if (t == xla::ffi::BF16)
    f(BF16{});
  else
    f(float{});
}

// q (S, Q, H, D); caches (L, pages, KV, page_size, D); page_table (S, P); positions
// (S, Q); kv_lens (S,). Query heads h = kv * group + g.
struct PagedArgs {
  const void* k;  // kv_type
  const void* v;
  const int32_t* table;
  const int32_t* positions;
  const int32_t* kv_lens;
  xla::ffi::DataType kv_type;
  int64_t S, Q, H, KV, D, page_size, table_width, num_pages, layer;
  float scale;  // 1 / sqrt(D)
};

// Fills `a` from the arguments, or says (prefixed by `kernel`) what is wrong with them:
// shapes that disagree, K and V of different types, a layer outside the cache, a page
// id outside the pool or a length past the page table (either would read outside it).
inline xla::ffi::Error ReadPagedArgs(const std::string& kernel,
                                     xla::ffi::Span<const int64_t> qd,
                                     xla::ffi::AnyBuffer k_cache, xla::ffi::AnyBuffer v_cache,
                                     xla::ffi::Buffer<xla::ffi::S32> layer,
                                     xla::ffi::Buffer<xla::ffi::S32> page_table,
                                     xla::ffi::Buffer<xla::ffi::S32> positions,
                                     xla::ffi::Buffer<xla::ffi::S32> kv_lens, PagedArgs& a) {
  namespace ffi = xla::ffi;
  auto fail = [&](const char* why) { return ffi::Error::InvalidArgument(kernel + ": " + why); };
  auto cd = k_cache.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || td.size() != 2 || qd[3] != cd[4] ||
      qd[2] % cd[2] != 0 || td[0] != qd[0] || positions.element_count() != qd[0] * qd[1] ||
      kv_lens.element_count() != qd[0]) {
    return fail("mismatched shapes");
  }
  a.kv_type = k_cache.element_type();
  if (v_cache.element_type() != a.kv_type || v_cache.dimensions().size() != 5 ||
      v_cache.element_count() != k_cache.element_count()) {
    return fail("K and V caches differ");
  }
  if (a.kv_type != ffi::F32 && a.kv_type != ffi::F16 && a.kv_type != ffi::BF16) {
    return fail("caches must be f32, f16 or bf16");
  }
  a.k = k_cache.untyped_data();
  a.v = v_cache.untyped_data();
  a.table = page_table.typed_data();
  a.positions = positions.typed_data();
  a.kv_lens = kv_lens.typed_data();
  a.S = qd[0];
  a.Q = qd[1];
  a.H = qd[2];
  a.D = qd[3];
  a.num_pages = cd[1];
  a.KV = cd[2];
  a.page_size = cd[3];
  a.table_width = td[1];
  a.layer = layer.typed_data()[0];
  a.scale = 1.0f / std::sqrt(static_cast<float>(a.D));
  if (a.layer < 0 || a.layer >= cd[0]) return fail("layer out of range");
  for (int64_t i = 0; i < td[0] * td[1]; ++i) {
    if (a.table[i] < 0 || a.table[i] >= a.num_pages) return fail("page id out of range");
  }
  for (int64_t s = 0; s < a.S; ++s) {
    if (a.kv_lens[s] > a.table_width * a.page_size) return fail("kv_lens past the page table");
  }
  return ffi::Error::Success();
}

}  // namespace sgljax
