"""The blocked paged attention against the one-shot reference and a dense numpy softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgljax.kernels.paged_attention import paged_attention, paged_attention_reference, write_kv

PAGE = 4


def _case(rng, kv_lens, q_lens, pages_per_seq, kv_heads=2, group=3, dim=8, layers=2):
    """Random cache and page tables. Returns inputs and the dense per-sequence K/V."""
    S = len(kv_lens)
    num_pages = 1 + S * pages_per_seq
    k_cache = rng.standard_normal((layers, num_pages, kv_heads, PAGE, dim)).astype(np.float32)
    v_cache = rng.standard_normal(k_cache.shape).astype(np.float32)
    k_cache[:, 0] = v_cache[:, 0] = 0  # page 0: the padding sink
    table = rng.permutation(np.arange(1, num_pages)).reshape(S, pages_per_seq).astype(np.int32)
    qn = max(q_lens)
    positions = np.zeros((S, qn), np.int32)
    for i, (kv, n) in enumerate(zip(kv_lens, q_lens)):
        positions[i, :n] = np.arange(kv - n, kv)
    q = rng.standard_normal((S, qn, kv_heads * group, dim)).astype(np.float32)
    return q, k_cache, v_cache, table, positions, np.asarray(kv_lens, np.int32)


def _dense(q, k_cache, v_cache, layer, table, positions, kv_lens, q_lens):
    S, _, H, D = q.shape
    kvh = k_cache.shape[2]
    out = np.zeros_like(q)
    for i in range(S):
        def tokens(cache):  # this sequence's (T, H, D), heads repeated for the group
            pages = cache[layer, table[i]].transpose(0, 2, 1, 3).reshape(-1, kvh, D)
            return np.repeat(pages[: kv_lens[i]], H // kvh, axis=1)

        k, v = tokens(k_cache), tokens(v_cache)
        for j in range(q_lens[i]):
            t = positions[i, j] + 1
            s = np.einsum("hd,thd->ht", q[i, j], k[:t]) / np.sqrt(D)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, j] = np.einsum("ht,thd->hd", p / p.sum(-1, keepdims=True), v[:t])
    return out


@pytest.mark.parametrize("kv_lens,q_lens", [
    ([1, 7, 33, 64], [1, 1, 1, 1]),  # decode, lengths around block edges
    ([20, 45, 9], [20, 5, 3]),  # prefill chunks, with and without a cached prefix
])
@pytest.mark.parametrize("block_pages,query_tile", [(1, 128), (3, 128), (4, 128), (1, 4),
                                                    (3, 7)])
def test_blocked_matches_dense_and_reference(kv_lens, q_lens, block_pages, query_tile):
    """query_tile below the chunk length: tiles of queries stop at their own last block."""
    rng = np.random.default_rng(sum(kv_lens) + block_pages)
    q, kc, vc, table, pos, kvl = _case(rng, kv_lens, q_lens, pages_per_seq=20)
    args = (jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.int32(1), jnp.asarray(table),
            jnp.asarray(pos), jnp.asarray(kvl))
    blocked = np.asarray(paged_attention(*args, block_pages=block_pages, query_tile=query_tile))
    reference = np.asarray(paged_attention_reference(*args))
    dense = _dense(q, kc, vc, 1, table, pos, kvl, q_lens)
    for i, n in enumerate(q_lens):  # rows past a sequence's chunk are padding
        np.testing.assert_allclose(blocked[i, :n], dense[i, :n], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(reference[i, :n], dense[i, :n], rtol=2e-5, atol=2e-5)


def test_stops_after_the_longest_sequence():
    """Pages past the last block in use are never read: poison them and the output is unchanged."""
    rng = np.random.default_rng(0)
    q, kc, vc, table, pos, kvl = _case(rng, [10, 30], [1, 1], pages_per_seq=32)
    clean = paged_attention(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.int32(0),
                            jnp.asarray(table), jnp.asarray(pos), jnp.asarray(kvl))
    unused = table[:, 8:].reshape(-1)  # 30 tokens = 8 pages = 2 blocks of 4 pages
    for page in unused:
        kc[:, page] = vc[:, page] = np.nan
    poisoned = paged_attention(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.int32(0),
                               jnp.asarray(table), jnp.asarray(pos), jnp.asarray(kvl))
    assert np.isfinite(np.asarray(poisoned)).all()
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))


def test_one_compile_serves_every_length():
    """The loop bound is data, not shape: different lengths reuse one executable."""
    rng = np.random.default_rng(1)
    f = jax.jit(paged_attention)
    for kv in (3, 17, 70):
        q, kc, vc, table, pos, kvl = _case(rng, [kv, 2], [1, 1], pages_per_seq=24)
        f(q, kc, vc, jnp.int32(0), table, pos, kvl)
    assert f._cache_size() == 1


def test_write_kv_puts_each_token_in_its_page_and_offset():
    rng = np.random.default_rng(2)
    layers, pages, kvh, dim = 2, 6, 2, 8
    kc = jnp.zeros((layers, pages, kvh, PAGE, dim))
    vc = jnp.zeros_like(kc)
    slots = np.asarray([[5 * PAGE + 3, 2 * PAGE + 0], [1 * PAGE + 1, 0]], np.int32)
    k_new = rng.standard_normal((2, 2, kvh, dim)).astype(np.float32)
    kc, vc = write_kv(kc, vc, jnp.int32(1), jnp.asarray(slots), jnp.asarray(k_new),
                      jnp.asarray(-k_new))
    kc = np.asarray(kc)
    for (i, j), slot in np.ndenumerate(slots):
        np.testing.assert_array_equal(kc[1, slot // PAGE, :, slot % PAGE], k_new[i, j])
    np.testing.assert_array_equal(np.asarray(vc)[1, 5, :, 3], -k_new[0, 0])
    assert not kc[0].any()  # the other layer is untouched
