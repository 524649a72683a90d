"""Attention over a paged KV cache, in pure JAX: every platform runs it.

The cache of one layer is an array of pages, ``(num_pages, kv_heads, page_size,
head_dim)``: head-major inside a page, so a gathered page is already laid out
as the dots want it (each head's keys contiguous). Token ``t`` of a sequence
lives in page ``page_table[t // page_size]`` at offset ``t % page_size``.

``paged_attention`` walks the page table a block of pages at a time with an
online softmax, and stops after the block holding the longest sequence's last
token. So the page table can be padded to the context length at no cost (one
shape for every length, few compiles), and each block's gathered keys and
values are small enough to stay in cache while they are used.
``paged_attention_reference`` is the one-shot version it is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so padded rows with nothing to attend to stay NaN-free
BLOCK_PAGES = 8  # pages per block: 128 tokens at page size 16, the fastest of 2-40 measured on CPU
QUERY_TILE = 128  # queries per tile in long prefill chunks


def gather_pages(cache: jax.Array, layer: jax.Array, pages: jax.Array) -> jax.Array:
    """cache (L, num_pages, KV, page_size, D), pages (S, B) → (S, B, KV, page_size, D).

    Whole pages are gathered (one index per page, not per token), and indexing
    layer and page in one gather keeps XLA from copying the layer.
    """
    return cache[layer, pages]


def visible_mask(key_pos: jax.Array, positions: jax.Array, kv_lens: jax.Array) -> jax.Array:
    """(S, Q, T) mask: causal within the sequence and inside its written tokens."""
    return ((key_pos[None, None, :] <= positions[:, :, None])
            & (key_pos[None, None, :] < kv_lens[:, None, None]))


def paged_attention(
    q: jax.Array,  # (S, Q, H, D) queries, already rotated
    k_cache: jax.Array,  # (L, num_pages, KV, page_size, D) keys, this step's already written
    v_cache: jax.Array,  # (L, num_pages, KV, page_size, D)
    layer: jax.Array,  # () which layer
    page_table: jax.Array,  # (S, P) page ids owned by each sequence
    positions: jax.Array,  # (S, Q) absolute position of each query token
    kv_lens: jax.Array,  # (S,) tokens in the cache for each sequence
    block_pages: int = BLOCK_PAGES,
    query_tile: int = QUERY_TILE,
    bf16_products: bool = False,
) -> jax.Array:
    """Long prefill chunks go a tile of queries at a time: each tile stops at the block
    holding its own last position, so a chunk skips the blocks causality hides from its
    early queries (half the work of a fresh prompt).

    ``bf16_products`` rounds q, k, v and the probabilities to bfloat16 and keeps every
    sum in float32: a float32 computation of what a TPU does with a bfloat16 model,
    and the CPU kernels' numerics for bfloat16 models (kernels/cpu_amx_attention.py)."""
    qn = q.shape[1]
    attend = lambda q, positions: _attend(  # noqa: E731
        q, k_cache, v_cache, layer, page_table, positions, kv_lens, block_pages, bf16_products)
    if qn <= query_tile:
        return attend(q, positions)
    tiles = [attend(q[:, i:i + query_tile], positions[:, i:i + query_tile])
             for i in range(0, qn, query_tile)]
    return jnp.concatenate(tiles, axis=1)


def round_bf16(x: jax.Array) -> jax.Array:
    """x rounded to bfloat16 and widened back to float32."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _attend(q, k_cache, v_cache, layer, page_table, positions, kv_lens, block_pages,
            bf16_products):
    s, qn, h, d = q.shape
    kvh, page_size = k_cache.shape[2], k_cache.shape[3]
    group = h // kvh
    block_tokens = block_pages * page_size
    table = jnp.pad(page_table, ((0, 0), (0, -page_table.shape[1] % block_pages)))
    # Keys past a query's position are hidden from it: stop after the last one seen.
    seen = jnp.minimum(kv_lens, jnp.max(positions, axis=1) + 1)
    num_blocks = (jnp.max(seen) + block_tokens - 1) // block_tokens
    if bf16_products:
        q = round_bf16(q)
    qg = (q * (1.0 / jnp.sqrt(jnp.float32(d))).astype(q.dtype)).reshape(s, qn, kvh, group, d)

    def block(b, carry):
        running_max, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(table, b * block_pages, block_pages, axis=1)
        k = gather_pages(k_cache, layer, pages)  # (S, B, KV, page_size, D)
        v = gather_pages(v_cache, layer, pages)
        if bf16_products:
            k, v = round_bf16(k), round_bf16(v)
        scores = jnp.einsum("sqkgd,sbktd->skgqbt", qg, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(s, kvh, group, qn, block_tokens)
        visible = visible_mask(b * block_tokens + jnp.arange(block_tokens), positions, kv_lens)
        scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
        new_max = jnp.maximum(running_max, scores.max(-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        denom = denom * rescale + probs.sum(-1)
        probs = probs.reshape(s, kvh, group, qn, block_pages, page_size)
        probs = (round_bf16(probs) if bf16_products  # a 16-bit cache under f32 queries: f32
                 else probs.astype(jnp.promote_types(v.dtype, q.dtype)))
        acc = acc * rescale[..., None] + jnp.einsum(
            "skgqbt,sbktd->skgqd", probs, v, preferred_element_type=jnp.float32)
        return new_max, denom, acc

    init = (jnp.full((s, kvh, group, qn), MASK_VALUE, jnp.float32),
            jnp.zeros((s, kvh, group, qn), jnp.float32),
            jnp.zeros((s, kvh, group, qn, d), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, block, init)
    out = acc / denom[..., None]  # every query sees at least itself, so denom > 0
    return out.transpose(0, 3, 1, 2, 4).reshape(s, qn, h, d).astype(q.dtype)


def paged_attention_reference(q, k_cache, v_cache, layer, page_table, positions,
                              kv_lens) -> jax.Array:
    """All pages at once: gather (S, P * page_size) keys, one softmax."""
    s, qn, h, d = q.shape
    kvh, page_size = k_cache.shape[2], k_cache.shape[3]
    group = h // kvh
    tokens = page_table.shape[1] * page_size

    def dense(cache):  # (S, P, KV, page_size, D) → (S, KV, T, D)
        return gather_pages(cache, layer, page_table).transpose(0, 2, 1, 3, 4).reshape(
            s, kvh, tokens, d)

    k, v = dense(k_cache), dense(v_cache)
    qg = q.reshape(s, qn, kvh, group, d)
    scores = jnp.einsum("sqkgd,sktd->skgqt", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
    visible = visible_mask(jnp.arange(tokens), positions, kv_lens)
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(jnp.promote_types(v.dtype, q.dtype))
    out = jnp.einsum("skgqt,sktd->sqkgd", probs, v).astype(q.dtype)
    return out.reshape(s, qn, h, d)


def write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, slots: jax.Array,
             k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values (S, Q, KV, D) into slots (S, Q) of ``layer``.

    Slot ``page * page_size + offset`` is the token's place in the pool."""
    page_size = k_cache.shape[3]
    flat = slots.reshape(-1)
    page, offset = flat // page_size, flat % page_size
    kv_shape = (flat.shape[0],) + k_new.shape[2:]  # (N, KV, D): advanced indices come first
    k_cache = k_cache.at[layer, page, :, offset].set(k_new.reshape(kv_shape).astype(k_cache.dtype))
    v_cache = v_cache.at[layer, page, :, offset].set(v_new.reshape(kv_shape).astype(v_cache.dtype))
    return k_cache, v_cache
