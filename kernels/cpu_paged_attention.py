"""Attention over pages on XLA CPU: a C++ kernel called through the XLA FFI.

The pure-JAX ``paged_attention`` gathers each block of pages into a temporary
before the dots read it; on CPU that costs about three passes over the KV
bytes, and in prefill chunks masked scores and their exponentials as well.
``cpu_paged_attention.cc`` reads every key and value row from the pool itself,
each query only up to its own position. It is built on first use
(kernels/cpu_build.py); callers check ``available()`` and fall back to
``paged_attention`` when it is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build

TARGET = "sgljax_cpu_paged_attention"


def available() -> bool:
    return cpu_build.load("cpu_paged_attention.cc", ((TARGET, "SgljaxPagedAttention"),))


def cpu_paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                        layer: jax.Array, page_table: jax.Array, positions: jax.Array,
                        kv_lens: jax.Array) -> jax.Array:
    """Same contract as ``paged_attention``: q (S, Q, H, D), caches (L, num_pages, KV,
    page_size, D) of float32, float16 or bfloat16 (both the same); computes in float32."""
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k_cache, v_cache, jnp.asarray(layer, jnp.int32).reshape(1),
        page_table.astype(jnp.int32), positions.astype(jnp.int32), kv_lens.astype(jnp.int32))
    return out.astype(q.dtype)
