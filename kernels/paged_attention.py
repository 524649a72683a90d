"""Attention over a paged KV cache: the pure-JAX reference every platform runs.

The cache of one layer is a flat array of token slots, ``(num_slots, kv_heads,
head_dim)``, where slot ``page * page_size + offset`` holds one token. A
sequence owns a list of pages (its row of ``page_table``). Only the pages a
sequence owns are gathered, never the whole cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so padded rows with nothing to attend to stay NaN-free


def gather_pages(cache: jax.Array, layer: jax.Array, page_table: jax.Array,
                 page_size: int) -> jax.Array:
    """cache (L, num_slots, KV, D), page_table (S, P) → (S, P * page_size, KV, D).

    Indexing layer and slots in one gather keeps XLA from copying the layer.
    """
    offsets = jnp.arange(page_size, dtype=page_table.dtype)
    slot_ids = (page_table[:, :, None] * page_size + offsets).reshape(page_table.shape[0], -1)
    return cache[layer, slot_ids]


def paged_attention(
    q: jax.Array,  # (S, Q, H, D) queries, already rotated
    k_cache: jax.Array,  # (L, num_slots, KV, D) keys, this step's already written
    v_cache: jax.Array,  # (L, num_slots, KV, D)
    layer: jax.Array,  # () which layer
    page_table: jax.Array,  # (S, P) page ids owned by each sequence
    positions: jax.Array,  # (S, Q) absolute position of each query token
    kv_lens: jax.Array,  # (S,) tokens in the cache for each sequence
    page_size: int,
) -> jax.Array:
    s, qn, h, d = q.shape
    kvh = k_cache.shape[2]
    group = h // kvh
    k = gather_pages(k_cache, layer, page_table, page_size)  # (S, T, KV, D)
    v = gather_pages(v_cache, layer, page_table, page_size)
    qg = q.reshape(s, qn, kvh, group, d)
    scores = jnp.einsum("sqkgd,stkd->skgqt", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    t = jnp.arange(k.shape[1])
    visible = (t[None, None, :] <= positions[:, :, None]) & (t[None, None, :] < kv_lens[:, None, None])
    scores = jnp.where(visible[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("skgqt,stkd->sqkgd", probs, v)
    return out.reshape(s, qn, h, d)


def write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, slots: jax.Array,
             k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values (S, Q, KV, D) into slot ids (S, Q) of ``layer``."""
    flat = slots.reshape(-1)
    kv_shape = (flat.shape[0],) + k_new.shape[2:]
    k_cache = k_cache.at[layer, flat].set(k_new.reshape(kv_shape).astype(k_cache.dtype))
    v_cache = v_cache.at[layer, flat].set(v_new.reshape(kv_shape).astype(v_cache.dtype))
    return k_cache, v_cache
