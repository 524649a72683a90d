"""The native ragged paged attention against the one-shot reference and a dense numpy softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgljax.kernels.paged_attention import (ragged_attention_reference, ragged_paged_attention,
                                            tree_bits_of, write_kv)
from ragged_cases import dense_answer, make_case, random_case, tree_case


def _check(case, fn, tol=2e-5, **kw):
    got = np.asarray(fn(*map(jnp.asarray, case.args()), **kw))
    want = dense_answer(case, kw.get("sliding_window"))  # case.tree_bits: with trees
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)  # padding tokens too: zeros


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("page_size,group,block_pages", [(1, 1, 3), (4, 3, 1), (16, 8, 2),
                                                         (64, 2, 1), (8, 4, 8)])
def test_random_ragged_batches(kind, page_size, group, block_pages):
    rng = np.random.default_rng(page_size * 31 + group + len(kind))
    for _ in range(3):
        case = random_case(rng, page_size=page_size, group=group, kind=kind, max_len=70)
        _check(case, ragged_paged_attention, block_pages=block_pages)
        _check(case, ragged_attention_reference)


@pytest.mark.parametrize("window", [1, 5, 17])
def test_sliding_window(window):
    rng = np.random.default_rng(window)
    case = make_case(rng, [40, 9, 33], [1, 9, 6], page_size=4)
    _check(case, ragged_paged_attention, sliding_window=window, block_pages=2)
    _check(case, ragged_attention_reference, sliding_window=window)


def test_stops_after_the_longest_sequence():
    """Pages past the last block in use are never read: poison them and the output is unchanged."""
    rng = np.random.default_rng(0)
    case = make_case(rng, [10, 30], [1, 1], page_size=4, pages_per_seq=32)
    clean = np.asarray(ragged_paged_attention(*map(jnp.asarray, case.args()), block_pages=4))
    unused = case.page_table[:2, 8:].reshape(-1)  # 30 tokens = 8 pages = 2 blocks of 4 pages
    case.k_cache[:, unused] = case.v_cache[:, unused] = np.nan
    poisoned = np.asarray(ragged_paged_attention(*map(jnp.asarray, case.args()), block_pages=4))
    assert np.isfinite(poisoned).all()
    np.testing.assert_array_equal(poisoned, clean)


def test_one_compile_serves_every_length_and_mix():
    """Lengths and the split of tokens between sequences are data, not shape."""
    rng = np.random.default_rng(1)
    f = jax.jit(ragged_paged_attention)
    for kv, ql in (([3, 17], [3, 1]), ([70, 2], [1, 1]), ([5, 9], [2, 2])):
        case = make_case(rng, kv, ql, page_size=4, pages_per_seq=24, pad_tokens=8 - sum(ql))
        f(*case.args())
    assert f._cache_size() == 1


def test_write_kv_puts_each_token_in_its_page_and_offset():
    rng = np.random.default_rng(2)
    layers, pages, kvh, dim, ps = 2, 6, 2, 8, 4
    kc = jnp.zeros((layers, pages, kvh, ps, dim))
    vc = jnp.zeros_like(kc)
    slots = np.asarray([5 * ps + 3, 2 * ps + 0, 1 * ps + 1, 0], np.int32)
    k_new = rng.standard_normal((4, kvh, dim)).astype(np.float32)
    kc, vc = write_kv(kc, vc, jnp.int32(1), jnp.asarray(slots), jnp.asarray(k_new),
                      jnp.asarray(-k_new))
    kc = np.asarray(kc)
    for i, slot in enumerate(slots[:3]):
        np.testing.assert_array_equal(kc[1, slot // ps, :, slot % ps], k_new[i])
    np.testing.assert_array_equal(np.asarray(vc)[1, 5, :, 3], -k_new[0])
    assert not kc[0].any()  # the other layer is untouched


@pytest.mark.parametrize("page_size,group,block_pages", [(4, 3, 2), (16, 2, 8)])
def test_token_trees_see_only_their_ancestors(page_size, group, block_pages):
    rng = np.random.default_rng(page_size + group)
    for _ in range(3):
        case = tree_case(rng, page_size=page_size, group=group)
        bits = jnp.asarray(case.tree_bits)
        _check(case, ragged_paged_attention, block_pages=block_pages, tree_bits=bits)
        _check(case, ragged_attention_reference, tree_bits=bits)


def test_tree_bits_of_a_row():
    # 0 -> 1 -> 3, 0 -> 2: node 3 sees itself, node 1 (2 back) and node 0 (3 back).
    bits = tree_bits_of([0, 0, 1]).astype(np.int64) & 0xFFFFFFFF
    assert [b & 0b1111 for b in bits] == [0b1111, 0b1111, 0b1101, 0b1101]
    assert all(b >> 4 == (0xFFFFFFFF >> 4) for b in bits)  # the prefix: always
    assert tree_bits_of([0, 1, 2]).tolist() == [-1] * 4  # a chain is causal
