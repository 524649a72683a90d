"""Decode attention over pages on XLA CPU: a C++ kernel called through the XLA FFI.

The pure-JAX ``paged_attention`` gathers each block of pages into a temporary
before the dots read it; on CPU a decode step is bound by memory traffic, and
that costs about three passes over the KV bytes. ``cpu_decode_attention.cc``
reads every key and value row once, from the pool itself. It is built on first
use (kernels/cpu_build.py); callers check ``available()`` and fall back to
``paged_attention`` when it is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.kernels import cpu_build

TARGET = "sgljax_cpu_decode_attention"


def available() -> bool:
    return cpu_build.load("cpu_decode_attention.cc", ((TARGET, "SgljaxDecodeAttention"),))


def cpu_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         layer: jax.Array, page_table: jax.Array, positions: jax.Array,
                         kv_lens: jax.Array) -> jax.Array:
    """Same contract as ``paged_attention`` for one query token per sequence (Q = 1).

    q (S, 1, H, D) float32; caches (L, num_pages, KV, page_size, D) float32."""
    s, qn, h, d = q.shape
    if qn != 1:
        raise ValueError(f"cpu_decode_attention takes one query token per sequence, not {qn}")
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((s, h, d), jnp.float32))(
        q.reshape(s, h, d).astype(jnp.float32), k_cache, v_cache,
        jnp.asarray(layer, jnp.int32).reshape(1), page_table.astype(jnp.int32),
        positions[:, 0].astype(jnp.int32), kv_lens.astype(jnp.int32))
    return out.reshape(s, 1, h, d).astype(q.dtype)
