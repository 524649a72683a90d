"""Attention with bfloat16 products: the AMX kernel and the pure-JAX path against the
one-shot reference of those numerics (and the AMX kernel against float32 attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgljax.kernels import cpu_amx_attention as amx
from sgljax.kernels.paged_attention import paged_attention, paged_attention_reference

needs_amx = pytest.mark.skipif(not amx.available(), reason="no C++ compiler or no AMX")


def _case(rng, *, seqs, qn, kv_heads, group, dim, page, pages_per_seq, cache_dtype):
    """A pool with shuffled pages, and chunks as the engine packs them: fresh prompts,
    chunks after a cached prefix, padded rows (position 0) and an empty sequence."""
    num_pages = 1 + seqs * pages_per_seq
    shape = (3, num_pages, kv_heads, page, dim)
    k = jnp.asarray(rng.standard_normal(shape), cache_dtype)
    v = jnp.asarray(rng.standard_normal(shape), cache_dtype)
    table = rng.permutation(np.arange(1, num_pages)).reshape(seqs, pages_per_seq)
    table = jnp.asarray(np.pad(table, ((0, 0), (0, 2))), jnp.int32)
    q = jnp.asarray(rng.standard_normal((seqs, qn, kv_heads * group, dim)), jnp.float32)
    full = pages_per_seq * page
    kv_lens = np.asarray([qn, full, full - 5, qn // 2 + 1, 0, 1][:seqs], np.int32)
    chunk = [qn, qn, max(1, qn - 3), qn // 2 + 1, 0, 1][:seqs]  # query tokens of each now
    positions = np.zeros((seqs, qn), np.int32)
    for i, (n, kv) in enumerate(zip(chunk, kv_lens)):
        positions[i, :n] = np.arange(kv - n, kv)
    return q, k, v, table, jnp.asarray(positions), jnp.asarray(kv_lens), chunk


# (query tokens, kv heads, group, head dim, page size): decode, a chunk of more than one
# unit of 256 rows (3 x 100), head dims of one to four 32-wide tiles, pages of 16 and not.
SHAPES = [(1, 3, 3, 64, 16), (100, 1, 3, 64, 16), (37, 2, 2, 32, 16), (20, 2, 4, 128, 8),
          (9, 1, 2, 96, 4)]


@needs_amx
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("qn,kv_heads,group,dim,page", SHAPES)
def test_amx_kernel_matches_its_numerics(qn, kv_heads, group, dim, page, cache_dtype):
    rng = np.random.default_rng(qn * dim + page)
    pages_per_seq = max(3, -(-(qn + 40) // page))
    q, k, v, table, positions, kv_lens, chunk = _case(
        rng, seqs=6, qn=qn, kv_heads=kv_heads, group=group, dim=dim, page=page,
        pages_per_seq=pages_per_seq, cache_dtype=cache_dtype)
    for layer in (0, 2):
        args = (k, v, jnp.int32(layer), table, positions, kv_lens)
        want = np.asarray(amx.amx_attention_reference(q, *args))
        widened = (k.astype(jnp.float32), v.astype(jnp.float32)) + args[2:]
        exact = np.asarray(paged_attention_reference(q, *widened))
        for query, rtol in ((q, 0), (q.astype(jnp.bfloat16), 2**-8)):  # bf16 q: bf16 out
            got = np.asarray(amx.amx_attention(query, *args)).astype(np.float32)
            for i, n in enumerate(chunk):  # rows past a sequence's chunk are padding
                # Within float32 sums (a probability may round the other way to bf16),
                # and within bf16 rounding of the float32 attention.
                np.testing.assert_allclose(got[i, :n], want[i, :n], rtol=rtol, atol=2e-3)
                np.testing.assert_allclose(got[i, :n], exact[i, :n], rtol=0, atol=4e-2)
        assert not np.any(got[4])  # a sequence with nothing cached attends to nothing


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("qn,kv_heads,group,dim,page", SHAPES[:1] + SHAPES[2:4] + [(3, 2, 4, 48, 8)])
def test_pure_jax_with_bf16_products(qn, kv_heads, group, dim, page, cache_dtype):
    rng = np.random.default_rng(3 * qn + dim)
    q, k, v, table, positions, kv_lens, chunk = _case(
        rng, seqs=4, qn=qn, kv_heads=kv_heads, group=group, dim=dim, page=page,
        pages_per_seq=max(3, -(-(qn + 140) // page)), cache_dtype=cache_dtype)
    args = (k, v, jnp.int32(1), table, positions, kv_lens)
    want = np.asarray(amx.amx_attention_reference(q, *args))
    got = np.asarray(paged_attention(q, *args, bf16_products=True))
    for i, n in enumerate(chunk):
        # Each block's probabilities are rounded against the running max, not the final one.
        np.testing.assert_allclose(got[i, :n], want[i, :n], rtol=0, atol=3e-3)


@needs_amx
def test_amx_kernel_refuses_what_it_cannot_do():
    rng = np.random.default_rng(0)
    q, k, v, table, positions, kv_lens, _ = _case(
        rng, seqs=2, qn=4, kv_heads=1, group=2, dim=64, page=16, pages_per_seq=2,
        cache_dtype="float32")
    assert not amx.supports((2, 4, 2, 48)) and amx.supports(q.shape)
    bad = table.at[1, 0].set(k.shape[1])  # one page past the pool
    with pytest.raises(Exception, match="page id out of range"):
        jax.block_until_ready(amx.amx_attention(q, k, v, jnp.int32(0), bad, positions, kv_lens))
    with pytest.raises(Exception, match="kv_lens past the page table"):
        jax.block_until_ready(amx.amx_attention(q, k, v, jnp.int32(0), table, positions,
                                                kv_lens.at[0].set(10_000)))
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(amx.amx_attention(q, k, v, jnp.int32(3), table, positions, kv_lens))
    with pytest.raises(Exception, match="head_dim"):
        jax.block_until_ready(amx.amx_attention(q[..., :48], k[..., :48], v[..., :48],
                                                jnp.int32(0), table, positions, kv_lens))
