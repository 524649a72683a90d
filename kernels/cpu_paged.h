// What the CPU attention kernels (cpu_paged_attention.cc, cpu_amx_attention.cc) share:
// the ragged step's arguments (kernels/paged_attention.py), checked before any row is
// read, and the cache's element types.
#pragma once

#include <algorithm>
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

// q (T, H, D); caches (L, pages, KV, page_size, D); page_table (S, P); cu_q_lens (S + 1,);
// kv_lens (S,); num_seqs (). Sequence s < num_seqs owns query tokens [cu[s], cu[s + 1]),
// the last q_len of its kv_lens[s] cached ones; query heads h = kv * group + g.
struct PagedArgs {
  const void* k;  // kv_type
  const void* v;
  const int32_t* table;
  const int32_t* cu;
  const int32_t* kv_lens;
  xla::ffi::DataType kv_type;
  int64_t T, H, KV, D, page_size, table_width, num_pages, layer, S, num_seqs;
  float scale;  // 1 / sqrt(D)

  int64_t QLen(int64_t s) const { return cu[s + 1] - cu[s]; }
  // Position of query token t of sequence s (cu[s] <= t < cu[s + 1]).
  int64_t Pos(int64_t s, int64_t t) const { return kv_lens[s] - QLen(s) + (t - cu[s]); }
  // Query tokens that belong to no sequence (padding): [RealEnd(), T) and [0, cu[0]).
  int64_t RealEnd() const { return num_seqs > 0 ? cu[num_seqs] : 0; }
  int64_t RealBegin() const { return num_seqs > 0 ? cu[0] : 0; }
};

// Fills `a` from the arguments, or says (prefixed by `kernel`) what is wrong with them:
// shapes that disagree, K and V of different types, a layer or num_seqs out of range, a
// page id outside the pool, a length past the page table (either would read outside
// it), or cu_q_lens that fall, pass the query tokens or give a sequence more queries
// than cached tokens.
inline xla::ffi::Error ReadPagedArgs(const std::string& kernel,
                                     xla::ffi::Span<const int64_t> qd,
                                     xla::ffi::AnyBuffer k_cache, xla::ffi::AnyBuffer v_cache,
                                     xla::ffi::Buffer<xla::ffi::S32> layer,
                                     xla::ffi::Buffer<xla::ffi::S32> page_table,
                                     xla::ffi::Buffer<xla::ffi::S32> cu_q_lens,
                                     xla::ffi::Buffer<xla::ffi::S32> kv_lens,
                                     xla::ffi::Buffer<xla::ffi::S32> num_seqs, PagedArgs& a) {
  namespace ffi = xla::ffi;
  auto fail = [&](const char* why) { return ffi::Error::InvalidArgument(kernel + ": " + why); };
  auto cd = k_cache.dimensions(), td = page_table.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || td.size() != 2 || qd[2] != cd[4] || cd[2] <= 0 ||
      qd[1] % cd[2] != 0 || kv_lens.element_count() != td[0] ||
      cu_q_lens.element_count() != td[0] + 1 || num_seqs.element_count() != 1 ||
      layer.element_count() != 1) {
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
  a.cu = cu_q_lens.typed_data();
  a.kv_lens = kv_lens.typed_data();
  a.T = qd[0];
  a.H = qd[1];
  a.D = qd[2];
  a.num_pages = cd[1];
  a.KV = cd[2];
  a.page_size = cd[3];
  a.S = td[0];
  a.table_width = td[1];
  a.layer = layer.typed_data()[0];
  a.num_seqs = num_seqs.typed_data()[0];
  a.scale = 1.0f / std::sqrt(static_cast<float>(a.D));
  if (a.layer < 0 || a.layer >= cd[0]) return fail("layer out of range");
  if (a.num_seqs < 0 || a.num_seqs > a.S) return fail("num_seqs out of range");
  for (int64_t i = 0; i < td[0] * td[1]; ++i) {
    if (a.table[i] < 0 || a.table[i] >= a.num_pages) return fail("page id out of range");
  }
  if (a.num_seqs > 0 && (a.cu[0] < 0 || a.cu[a.num_seqs] > a.T)) {
    return fail("cu_q_lens past the query tokens");
  }
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    if (a.kv_lens[s] > a.table_width * a.page_size) return fail("kv_lens past the page table");
    if (a.QLen(s) < 0) return fail("cu_q_lens must not fall");
    if (a.QLen(s) > a.kv_lens[s]) return fail("more query tokens than kv_lens");
  }
  return ffi::Error::Success();
}

}  // namespace sgljax
