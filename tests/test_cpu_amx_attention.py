"""Attention with bfloat16 products on the ragged step: the AMX kernel and the pure-JAX
path against the one-shot reference of those numerics (and the AMX kernel against
float32 attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragged_cases import make_case
from sgljax.kernels import cpu_amx_attention as amx
from sgljax.kernels.paged_attention import ragged_attention_reference, ragged_paged_attention

needs_amx = pytest.mark.skipif(not amx.available(), reason="no C++ compiler or no AMX")


def _case(rng, *, qn, kv_heads, group, dim, page, cache_dtype, extra=40):
    """A shuffled pool and a ragged step as the engine packs one: fresh prompts, chunks
    after a cached prefix, a decode token, a padding sequence and padding tokens."""
    kv = [qn, qn + extra, qn + extra - 5, qn // 2 + 1, 1]
    q_lens = [qn, qn, max(1, qn - 3), qn // 2 + 1, 1]
    c = make_case(rng, kv, q_lens, page_size=page, kv_heads=kv_heads, group=group, dim=dim,
                  layers=3, pad_seqs=1, pad_tokens=5)
    k = jnp.asarray(c.k_cache, cache_dtype)
    v = jnp.asarray(c.v_cache, cache_dtype)
    rest = tuple(map(jnp.asarray, (c.page_table, c.cu_q_lens, c.kv_lens, np.int32(c.num_seqs))))
    return jnp.asarray(c.q), k, v, rest, c.num_real_tokens


# (query tokens, kv heads, group, head dim, page size): decode, a chunk of more than one
# unit of 256 rows (3 x 100), head dims of one to four 32-wide tiles, pages of 16 and not.
SHAPES = [(1, 3, 3, 64, 16), (100, 1, 3, 64, 16), (37, 2, 2, 32, 16), (20, 2, 4, 128, 8),
          (9, 1, 2, 96, 4)]


@needs_amx
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("qn,kv_heads,group,dim,page", SHAPES)
def test_amx_kernel_matches_its_numerics(qn, kv_heads, group, dim, page, cache_dtype):
    rng = np.random.default_rng(qn * dim + page)
    q, k, v, (table, cu, kv_lens, num_seqs), real = _case(
        rng, qn=qn, kv_heads=kv_heads, group=group, dim=dim, page=page, cache_dtype=cache_dtype)
    for layer in (0, 2):
        args = (k, v, jnp.int32(layer), table, cu, kv_lens, num_seqs)
        want = np.asarray(amx.amx_attention_reference(q, *args))
        widened = (k.astype(jnp.float32), v.astype(jnp.float32)) + args[2:]
        exact = np.asarray(ragged_attention_reference(q, *widened))
        for query, rtol in ((q, 0), (q.astype(jnp.bfloat16), 2**-8)):  # bf16 q: bf16 out
            got = np.asarray(amx.amx_attention(query, *args)).astype(np.float32)
            # Within float32 sums (a probability may round the other way to bf16),
            # and within bf16 rounding of the float32 attention.
            np.testing.assert_allclose(got[:real], want[:real], rtol=rtol, atol=2e-3)
            np.testing.assert_allclose(got[:real], exact[:real], rtol=0, atol=4e-2)
            assert not np.any(got[real:])  # padding tokens attend to nothing


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("qn,kv_heads,group,dim,page", SHAPES[:1] + SHAPES[2:4] + [(3, 2, 4, 48, 8)])
def test_pure_jax_with_bf16_products(qn, kv_heads, group, dim, page, cache_dtype):
    rng = np.random.default_rng(3 * qn + dim)
    q, k, v, rest, real = _case(rng, qn=qn, kv_heads=kv_heads, group=group, dim=dim,
                                page=page, cache_dtype=cache_dtype, extra=140)
    args = (k, v, jnp.int32(1)) + rest
    want = np.asarray(amx.amx_attention_reference(q, *args))
    got = np.asarray(ragged_paged_attention(q, *args, bf16_products=True))
    # Each block's probabilities are rounded against the running max, not the final one.
    np.testing.assert_allclose(got[:real], want[:real], rtol=0, atol=3e-3)
    assert not np.any(want[real:])


def test_supports_the_ragged_query_shape():
    assert amx.supports((7, 9, 64)) and amx.supports((1, 2, 32))
    assert not amx.supports((7, 9, 48)) and not amx.supports((2, 4, 9, 64))


@needs_amx
def test_amx_kernel_refuses_what_it_cannot_do():
    rng = np.random.default_rng(0)
    q, k, v, (table, cu, kv_lens, num_seqs), _ = _case(
        rng, qn=4, kv_heads=1, group=2, dim=64, page=16, cache_dtype="float32")
    bad = table.at[1, 0].set(k.shape[1])  # one page past the pool
    with pytest.raises(Exception, match="page id out of range"):
        jax.block_until_ready(amx.amx_attention(q, k, v, jnp.int32(0), bad, cu, kv_lens, num_seqs))
    with pytest.raises(Exception, match="kv_lens past the page table"):
        jax.block_until_ready(amx.amx_attention(q, k, v, jnp.int32(0), table, cu,
                                                kv_lens.at[0].set(10_000), num_seqs))
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(amx.amx_attention(q, k, v, jnp.int32(3), table, cu, kv_lens, num_seqs))
    with pytest.raises(Exception, match="head_dim"):
        jax.block_until_ready(amx.amx_attention(q[..., :48], k[..., :48], v[..., :48],
                                                jnp.int32(0), table, cu, kv_lens, num_seqs))
