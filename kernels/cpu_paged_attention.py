"""Ragged attention over pages on XLA CPU: a C++ kernel called through the XLA FFI.

The pure-JAX ``ragged_paged_attention`` gathers each block of pages into a
temporary before the dots read it; on CPU that costs about three passes over the
KV bytes, and in prefill chunks masked scores and their exponentials as well.
``cpu_paged_attention.cc`` reads every key and value row from the pool itself, a
page of all kv heads at a time with an online softmax, each query only up to its
own position. It is built on first use (kernels/cpu_build.py); callers check
``available()`` and fall back to ``ragged_paged_attention`` when it is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sgljax.kernels import cpu_build

TARGET = "sgljax_cpu_paged_attention"


def available() -> bool:
    return cpu_build.load("cpu_paged_attention.cc", ((TARGET, "SgljaxPagedAttention"),))


def cpu_paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                        layer: jax.Array, page_table: jax.Array, cu_q_lens: jax.Array,
                        kv_lens: jax.Array, num_seqs: jax.Array, *,
                        sliding_window: int | None = None,
                        bf16_products: bool = False,
                        tree_bits: jax.Array | None = None) -> jax.Array:
    """Same contract as ``ragged_paged_attention`` (kernels/paged_attention.py): q (T, H,
    D), caches (L, num_pages, KV, page_size, D) of float32, float16 or bfloat16 (both the
    same); computes in float32 and returns q's dtype. ``bf16_products`` rounds q, k, v and
    the probabilities to bfloat16 and keeps the sums in float32, as the reference's.
    ``tree_bits`` (T,): token trees, as the reference's."""
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        jnp.asarray(q, jnp.float32), k_cache, v_cache, i32(layer).reshape(1), i32(page_table),
        i32(cu_q_lens), i32(kv_lens), i32(num_seqs).reshape(1),
        jnp.zeros((0,), jnp.int32) if tree_bits is None else i32(tree_bits),
        bf16_products=bool(bf16_products), sliding_window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)
