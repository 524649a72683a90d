"""Attention of prefill chunks on Intel AMX (XLA CPU): a C++ kernel called through the XLA FFI.

A prefill chunk's queries of one kv head form a matrix, so its attention is two
matmuls per head, ``S = Q Kᵀ`` and ``O = P V``: ``cpu_amx_attention.cc`` runs both
on the tile unit in bfloat16 with float32 sums (the numerics of a TPU serving a
bfloat16 model), reading K and V straight from the pages. The vector-unit kernel
(cpu_paged_attention.py) stays for decode steps, where there is one query per
sequence and reading the cache is the cost.
Needs a CPU with AMX-BF16 and is built on first use (kernels/cpu_build.py);
callers check ``available()`` and ``supports(q.shape)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build
from sgljax.kernels.paged_attention import gather_pages, round_bf16, visible_mask

TARGET = "sgljax_cpu_amx_attention"


def available() -> bool:
    return cpu_build.load("cpu_amx_attention.cc", ((TARGET, "SgljaxAmxAttention"),),
                          "SgljaxAmxAttentionSupported")


def supports(q_shape: tuple[int, ...]) -> bool:
    """Queries (S, Q, H, D) the kernel takes: head_dim in tiles of 32."""
    return len(q_shape) == 4 and q_shape[3] % 32 == 0


def amx_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                  page_table: jax.Array, positions: jax.Array, kv_lens: jax.Array) -> jax.Array:
    """Same contract as ``paged_attention``, with bfloat16 products (see the module doc);
    q float32 or bfloat16, caches float32, float16 or bfloat16; returns q's dtype."""
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k_cache, v_cache, jnp.asarray(layer, jnp.int32).reshape(1),
        page_table.astype(jnp.int32), positions.astype(jnp.int32), kv_lens.astype(jnp.int32))
    return out.astype(q.dtype)


def amx_attention_reference(q, k_cache, v_cache, layer, page_table, positions,
                            kv_lens) -> jax.Array:
    """The kernel's numerics in one shot: q, k, v and the unnormalized probabilities
    rounded to bfloat16, every sum in float32, divided by the float32 denominator."""
    s, qn, h, d = q.shape
    kvh, page_size = k_cache.shape[2], k_cache.shape[3]
    tokens = page_table.shape[1] * page_size

    def dense(cache):  # (S, P, KV, page_size, D) → (S, KV, T, D)
        return round_bf16(gather_pages(cache, layer, page_table).transpose(0, 2, 1, 3, 4).reshape(
            s, kvh, tokens, d))

    k, v = dense(k_cache), dense(v_cache)
    qg = round_bf16(q).reshape(s, qn, kvh, h // kvh, d)
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("sqkgd,sktd->skgqt", qg, k, precision=hi)
    visible = visible_mask(jnp.arange(tokens), positions, kv_lens)[:, None, None]
    top = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(visible, jnp.exp((scores - top) * (1.0 / jnp.sqrt(jnp.float32(d)))), 0.0)
    denom = probs.sum(-1)  # (S, KV, G, Q)
    out = jnp.einsum("skgqt,sktd->sqkgd", round_bf16(probs), v, precision=hi)
    out = out / jnp.maximum(denom.transpose(0, 3, 1, 2), 1e-30)[..., None]
    return out.reshape(s, qn, h, d).astype(q.dtype)
