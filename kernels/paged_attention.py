"""Ragged paged attention in pure JAX: the reference every platform can run.

A step is a flat batch of T query tokens: any mix of decode tokens and prefill
chunks. Sequence ``s`` owns tokens ``cu_q_lens[s] : cu_q_lens[s + 1]``, which are
the last ``q_len`` of its ``kv_lens[s]`` cached tokens (this step's K/V already
written), so query ``j`` of sequence ``s`` sits at position
``kv_lens[s] - q_len + j`` and sees the keys up to it (causal), or only the last
``sliding_window`` of them. Sequences ``num_seqs`` and up are padding: their
ranges are empty, and tokens past ``cu_q_lens[num_seqs]`` are padding whose
output is zero.

The cache of one layer is an array of pages, ``(num_pages, kv_heads, page_size,
head_dim)``: head-major inside a page, so a gathered page is already laid out as
the dots want it. Token ``t`` of a sequence lives in page
``page_table[s, t // page_size]`` at offset ``t % page_size``.

Every backend takes this contract (``--attention-backend``): this file's
``ragged_paged_attention`` (native), the Pallas TPU kernel
(kernels/pallas_attention.py) and the C++ CPU kernels (kernels/cpu_*.py).
Here each query token walks its own sequence's pages a block at a time with an
online softmax and stops after the block holding the last position any token of
the step sees: the page table is padded to the context length at no cost (one
shape serves every length). Gathering per token is simple and exact; the
kernels read each page once per sequence instead.
``ragged_attention_reference`` is the one-shot version the others are tested against.

Token trees (speculative decoding, engine/speculative.py): ``tree_bits`` (T,) int32
narrows what a query token sees among the 31 positions before its own. Bit ``d``
set: the key ``d`` positions back is visible (bit 0 is the token itself). A verify
row of tree nodes sets the bits of each node's ancestors and every bit past the
row's start (the cached prefix); -1 (all bits) is plain causal attention. Positions
32 and more back are always visible: a tree has at most 32 nodes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -1e30  # finite, so rows with nothing to attend to stay NaN-free
BLOCK_PAGES = 8  # pages per block: 128 tokens at page size 16, the fastest of 2-40 measured on CPU


def gather_pages(cache: jax.Array, layer: jax.Array, pages: jax.Array) -> jax.Array:
    """cache (L, num_pages, KV, page_size, D), pages (N, B) → (N, B, KV, page_size, D).

    Whole pages are gathered (one index per page, not per token), and indexing
    layer and page in one gather keeps XLA from copying the layer.
    """
    return cache[layer, pages]


def round_bf16(x: jax.Array) -> jax.Array:
    """x rounded to bfloat16 and widened back to float32."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def token_layout(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """Per query token of a ragged step: (its sequence (T,), its position (T,), real (T,) bool)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    real = t < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    return seq, jnp.where(real, pos, 0), real


TREE_SPAN = 32  # positions back that tree_bits covers


def tree_bits_of(parents) -> np.ndarray:
    """The tree_bits of a row of tree nodes: node 0 (the row's first token) and nodes
    1..n, where ``parents[j]`` (< j + 1) is node j + 1's parent. (n + 1,) int32."""
    bits = [-1]
    for i in range(1, len(parents) + 1):
        seen, node = (-1 << i) | 1, i  # itself, node 0 (i back) and everything before
        while node:
            node = int(parents[node - 1])
            seen |= 1 << (i - node)
        bits.append(seen)
    return np.asarray(bits, np.int64).astype(np.int32)  # wraps bit 31 to the sign


def visible(key_pos: jax.Array, pos: jax.Array, real: jax.Array,
            sliding_window: int | None, tree_bits: jax.Array | None = None) -> jax.Array:
    """(T, K) mask: key positions each query token sees."""
    back = pos[:, None] - key_pos[None, :]
    seen = (back >= 0) & real[:, None]
    if sliding_window is not None:
        seen &= back < sliding_window
    if tree_bits is not None:
        bit = (tree_bits[:, None] >> jnp.clip(back, 0, TREE_SPAN - 1)) & 1
        seen &= (back >= TREE_SPAN) | (bit == 1)
    return seen


def ragged_paged_attention(
    q: jax.Array,  # (T, H, D) queries, already rotated
    k_cache: jax.Array,  # (L, num_pages, KV, page_size, D) keys, this step's already written
    v_cache: jax.Array,  # (L, num_pages, KV, page_size, D)
    layer: jax.Array,  # () which layer
    page_table: jax.Array,  # (S, P) page ids owned by each sequence
    cu_q_lens: jax.Array,  # (S + 1,) where each sequence's query tokens start in q
    kv_lens: jax.Array,  # (S,) tokens in the cache for each sequence, this step's included
    num_seqs: jax.Array,  # () sequences in use; the rest are padding
    *,
    sliding_window: int | None = None,
    block_pages: int = BLOCK_PAGES,
    bf16_products: bool = False,
    tree_bits: jax.Array | None = None,  # (T,) int32: token trees (the module doc)
) -> jax.Array:
    """(T, H, D) attention output in q's dtype; padding tokens give zeros.

    ``bf16_products`` rounds q, k, v and the probabilities to bfloat16 and keeps every
    sum in float32: a float32 computation of what a TPU does with a bfloat16 model,
    and the CPU kernels' numerics for bfloat16 models."""
    T, H, D = q.shape
    kvh, page_size = k_cache.shape[2], k_cache.shape[3]
    group = H // kvh
    block_tokens = block_pages * page_size
    seq, pos, real = token_layout(cu_q_lens, kv_lens, num_seqs, T)
    table = page_table[seq]  # (T, P): each token walks its own sequence's pages
    table = jnp.pad(table, ((0, 0), (0, -table.shape[1] % block_pages)))
    num_blocks = (jnp.max(jnp.where(real, pos, -1)) + block_tokens) // block_tokens
    first_block = 0
    if sliding_window is not None:
        lowest = jnp.min(jnp.where(real, pos - sliding_window + 1, jnp.iinfo(jnp.int32).max))
        first_block = jnp.minimum(jnp.maximum(lowest, 0) // block_tokens, num_blocks)
    if bf16_products:
        q = round_bf16(q)
    qg = (q * (1.0 / jnp.sqrt(jnp.float32(D))).astype(q.dtype)).reshape(T, kvh, group, D)

    def block(b, carry):
        running_max, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(table, b * block_pages, block_pages, axis=1)
        k = gather_pages(k_cache, layer, pages)  # (T, B, KV, page_size, D)
        v = gather_pages(v_cache, layer, pages)
        if bf16_products:
            k, v = round_bf16(k), round_bf16(v)
        scores = jnp.einsum("tkgd,tbkpd->tkgbp", qg, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(T, kvh, group, block_tokens)
        seen = visible(b * block_tokens + jnp.arange(block_tokens), pos, real, sliding_window,
                       tree_bits)
        scores = jnp.where(seen[:, None, None], scores, MASK_VALUE)
        new_max = jnp.maximum(running_max, scores.max(-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        denom = denom * rescale + probs.sum(-1)
        probs = probs.reshape(T, kvh, group, block_pages, page_size)
        probs = (round_bf16(probs) if bf16_products  # a 16-bit cache under f32 queries: f32
                 else probs.astype(jnp.promote_types(v.dtype, q.dtype)))
        acc = acc * rescale[..., None] + jnp.einsum(
            "tkgbp,tbkpd->tkgd", probs, v, preferred_element_type=jnp.float32)
        return new_max, denom, acc

    init = (jnp.full((T, kvh, group), MASK_VALUE, jnp.float32),
            jnp.zeros((T, kvh, group), jnp.float32),
            jnp.zeros((T, kvh, group, D), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(first_block, num_blocks, block, init)
    out = acc / jnp.maximum(denom, 1e-30)[..., None]  # a real token sees itself: denom > 0
    out = jnp.where(real[:, None, None, None], out, 0.0)
    return out.reshape(T, H, D).astype(q.dtype)


def ragged_attention_reference(q, k_cache, v_cache, layer, page_table, cu_q_lens, kv_lens,
                               num_seqs, *, sliding_window: int | None = None,
                               tree_bits: jax.Array | None = None) -> jax.Array:
    """All of each token's sequence pages at once: gather (T, P * page_size) keys, one softmax."""
    T, H, D = q.shape
    kvh, page_size = k_cache.shape[2], k_cache.shape[3]
    group = H // kvh
    seq, pos, real = token_layout(cu_q_lens, kv_lens, num_seqs, T)
    tokens = page_table.shape[1] * page_size

    def dense(cache):  # (T, P, KV, page_size, D) → (T, KV, K, D)
        return gather_pages(cache, layer, page_table[seq]).transpose(0, 2, 1, 3, 4).reshape(
            T, kvh, tokens, D)

    k, v = dense(k_cache), dense(v_cache)
    qg = q.reshape(T, kvh, group, D)
    scores = jnp.einsum("tkgd,tkpd->tkgp", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(D)))
    seen = visible(jnp.arange(tokens), pos, real, sliding_window, tree_bits)
    scores = jnp.where(seen[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(jnp.promote_types(v.dtype, q.dtype))
    out = jnp.einsum("tkgp,tkpd->tkgd", probs, v).astype(jnp.float32)
    out = jnp.where(real[:, None, None, None], out, 0.0)
    return out.reshape(T, H, D).astype(q.dtype)


def write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array, slots: jax.Array,
             k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys/values (T, KV, D) into slots (T,) of ``layer``.

    Slot ``page * page_size + offset`` is the token's place in the pool; padding
    tokens write into page 0, which no sequence owns."""
    page_size = k_cache.shape[3]
    page, offset = slots // page_size, slots % page_size
    k_cache = k_cache.at[layer, page, :, offset].set(k_new.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, page, :, offset].set(v_new.astype(v_cache.dtype))
    return k_cache, v_cache

