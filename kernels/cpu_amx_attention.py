"""Attention of prefill chunks on Intel AMX (XLA CPU): a C++ kernel called through the XLA FFI.

A prefill chunk's queries of one kv head form a matrix, so its attention is two
matmuls per head, ``S = Q Kᵀ`` and ``O = P V``: ``cpu_amx_attention.cc`` runs both
on the tile unit in bfloat16 with float32 sums (the numerics of a TPU serving a
bfloat16 model), reading K and V straight from the pages. It takes the ragged step
of kernels/paged_attention.py (flat query tokens, ``cu_q_lens``, ``kv_lens``,
``num_seqs``). The vector-unit kernel (cpu_paged_attention.py) stays for decode
steps, where there is one query per sequence and reading the cache is the cost.
Needs a CPU with AMX-BF16 and is built on first use (kernels/cpu_build.py);
callers check ``available()`` and ``supports(q.shape)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build
from sgljax.kernels.paged_attention import gather_pages, round_bf16, token_layout, visible

TARGET = "sgljax_cpu_amx_attention"


def available() -> bool:
    return cpu_build.load("cpu_amx_attention.cc", ((TARGET, "SgljaxAmxAttention"),),
                          "SgljaxAmxAttentionSupported")


def supports(q_shape: tuple[int, ...]) -> bool:
    """Queries (T, H, D) the kernel takes: head_dim in tiles of 32."""
    return len(q_shape) == 3 and q_shape[2] % 32 == 0


def amx_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                  page_table: jax.Array, cu_q_lens: jax.Array, kv_lens: jax.Array,
                  num_seqs: jax.Array) -> jax.Array:
    """Same contract as ``ragged_paged_attention``, with bfloat16 products (see the
    module doc); q (T, H, D) float32 or bfloat16, caches float32, float16 or bfloat16;
    returns q's dtype, zeros for padding tokens."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k_cache, v_cache, i32(layer).reshape(1), i32(page_table), i32(cu_q_lens),
        i32(kv_lens), i32(num_seqs).reshape(1))
    return out.astype(q.dtype)


def amx_attention_reference(q, k_cache, v_cache, layer, page_table, cu_q_lens, kv_lens,
                            num_seqs) -> jax.Array:
    """The kernel's numerics in one shot: q, k, v and the unnormalized probabilities
    rounded to bfloat16, every sum in float32, divided by the float32 denominator."""
    t, h, d = q.shape
    kvh, page_size = k_cache.shape[2], k_cache.shape[3]
    seq, pos, real = token_layout(cu_q_lens, kv_lens, num_seqs, t)
    tokens = page_table.shape[1] * page_size

    def dense(cache):  # (T, P, KV, page_size, D) → (T, KV, K, D)
        return round_bf16(gather_pages(cache, layer, page_table[seq]).transpose(
            0, 2, 1, 3, 4).reshape(t, kvh, tokens, d))

    k, v = dense(k_cache), dense(v_cache)
    qg = round_bf16(q).reshape(t, kvh, h // kvh, d)
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("tkgd,tkpd->tkgp", qg, k, precision=hi)
    seen = visible(jnp.arange(tokens), pos, real, None)[:, None, None]
    top = jnp.max(jnp.where(seen, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    probs = jnp.where(seen, jnp.exp((scores - top) * (1.0 / jnp.sqrt(jnp.float32(d)))), 0.0)
    denom = probs.sum(-1)  # (T, KV, G)
    out = jnp.einsum("tkgp,tkpd->tkgd", round_bf16(probs), v, precision=hi)
    out = out / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(t, h, d).astype(q.dtype)
