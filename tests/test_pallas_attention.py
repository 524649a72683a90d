"""The Pallas TPU kernels (kernels/pallas_attention.py) in TPU interpret mode.

Attention is checked against ragged_cases.dense_answer (float64 numpy) on random
ragged batches of one fixed shape per configuration (so one jit compile serves
every case of it): decode-only, prefill-only (some with a cached prefix) and
mixed; page sizes 1, 4, 16, 64; GQA groups 1, 2, 4, 8; lengths crossing page and
kv-block boundaries; sliding windows; padding sequences and padding tokens
(zeros). Both the default ``block_sizes`` and small overrides (several q blocks
per sequence, several kv blocks per q block, so the double buffer turns over)
are run. Most runs use eager DMAs (``dma_execution_mode="eager"``: a copy lands
when started, so a prefetch into a buffer still in use would corrupt it); the
prefix-cache, scan and write tests use the default interpret mode
(``interpret=None``: DMAs land when waited on).

Tolerances: float32 2e-5 (measured max abs error 3.8e-7 over this matrix);
bfloat16 inputs (bf16 products, f32 sums, bf16 output) 2e-2 against the float64
answer of the bf16-rounded inputs (measured max abs error 5.9e-3 over 12 mixed
batches, page sizes 1/4/16/64: about one bf16 ulp of outputs of magnitude 1-2,
i.e. mostly the output's own rounding).

The kernel must never read pages after a sequence's last one (nor, with a
sliding window, before the first one its queries see): those pages are poisoned
with NaN, and their page-table entries point at an out-of-bounds page id, which
interpret mode refuses to DMA (NaN alone cannot catch a read, since the kernel
masks K and zeroes V outside the range). Both kernels are also lowered to Mosaic for a
TPU target (no TPU needed for that half of the compile). File runtime here:
35-65 s on 2 shared cores (about 40 s of CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ragged_cases import RaggedCase, dense_answer, make_case, tree_case
from sgljax.kernels.paged_attention import ragged_attention_reference, write_kv
from sgljax.kernels.pallas_attention import (block_sizes, pallas_write_kv,
                                             ragged_paged_attention_pallas)

F32_TOL = 2e-5
BF16_TOL = 2e-2


def fixed_case(rng, kind: str, *, tokens: int, seqs: int, max_len: int, page_size: int,
               group: int, kv_heads: int = 2, dim: int = 8) -> RaggedCase:
    """A random ragged batch of fixed shapes: T = tokens, S = seqs, P = max_len pages' worth
    + 1. Real sequences are 1..seqs-1 (at least one padding slot), padding tokens fill T."""
    pages = -(-max_len // page_size) + 1
    while True:
        n = int(rng.integers(1, seqs))
        kv = [int(rng.integers(1, max_len + 1)) for _ in range(n)]
        if kind == "decode":
            ql = [1] * n
        elif kind == "prefill":
            ql = [k if rng.random() < 0.5 else int(rng.integers(1, k + 1)) for k in kv]
        else:
            ql = [1 if rng.random() < 0.5 else int(rng.integers(1, k + 1)) for k in kv]
        if sum(ql) < tokens:  # at least one padding token
            break
    return make_case(rng, kv, ql, page_size=page_size, group=group, kv_heads=kv_heads, dim=dim,
                     pad_seqs=seqs - n, pad_tokens=tokens - sum(ql), pages_per_seq=pages)


# DMAs run when started, not when waited on (the default): a prefetch into a buffer
# still being read would clobber it and show.
EAGER = pltpu.InterpretParams(dma_execution_mode="eager")


def attention_fn(sliding_window=None, interpret=EAGER, **blocks):
    return jax.jit(lambda *a: ragged_paged_attention_pallas(
        *a, sliding_window=sliding_window, interpret=interpret, **blocks))


def check(fn, case: RaggedCase, sliding_window=None, dtype=np.float32) -> float:
    out = np.asarray(fn(*case.args(dtype)).astype(jnp.float32))
    assert out.shape == case.q.shape and np.isfinite(out).all()
    if dtype == np.float32:
        want, tol = dense_answer(case, sliding_window), F32_TOL
    else:  # the exact answer for the bf16-rounded inputs
        r = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
        rounded = RaggedCase(r(case.q), r(case.k_cache), r(case.v_cache), case.layer,
                             case.page_table, case.cu_q_lens, case.kv_lens, case.num_seqs,
                             case.q_lens)
        want, tol = dense_answer(rounded, sliding_window), BF16_TOL
    assert (out[case.num_real_tokens:] == 0).all()  # padding tokens
    err = float(np.abs(out - want).max())
    assert err < tol, err
    return err


# (page_size, group, max_len, block overrides): each config compiles once.
CONFIGS = [
    (1, 1, 12, dict(q_block=4, kv_pages=4)),
    (4, 2, 30, dict()),
    (4, 8, 30, dict(q_block=2, kv_pages=2)),
    (16, 4, 40, dict(q_block=4, kv_pages=1)),
    (64, 8, 140, dict()),
    (64, 2, 140, dict(q_block=8, kv_pages=1)),
]


@pytest.mark.parametrize("page_size,group,max_len,blocks", CONFIGS)
def test_matches_dense_f32(page_size, group, max_len, blocks):
    rng = np.random.default_rng(page_size * 10 + group)
    fn = attention_fn(**blocks)
    for kind in ("decode", "prefill", "mixed"):
        case = fixed_case(rng, kind, tokens=24, seqs=4, max_len=max_len, page_size=page_size,
                          group=group)
        check(fn, case)
    assert fn._cache_size() == 1  # one compile for every length and mix of the shape


@pytest.mark.parametrize("page_size,group,window,blocks", [
    (4, 2, 5, dict(q_block=2, kv_pages=1)),
    (16, 4, 20, dict(q_block=4, kv_pages=1)),
    (1, 2, 3, dict()),
])
def test_sliding_window(page_size, group, window, blocks):
    rng = np.random.default_rng(window)
    fn = attention_fn(sliding_window=window, **blocks)
    for kind in ("prefill", "mixed"):
        case = fixed_case(rng, kind, tokens=20, seqs=4, max_len=40, page_size=page_size,
                          group=group)
        check(fn, case, sliding_window=window)


@pytest.mark.parametrize("page_size,group,blocks", [
    (4, 2, dict(q_block=2, kv_pages=2)),
    (16, 4, dict()),
])
def test_bfloat16(page_size, group, blocks):
    rng = np.random.default_rng(7 + page_size)
    fn = attention_fn(**blocks)
    case = fixed_case(rng, "mixed", tokens=24, seqs=4, max_len=40, page_size=page_size,
                      group=group)
    check(fn, case, dtype=jnp.bfloat16)
    out = fn(*case.args(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


def test_prefix_cached_and_page_boundaries():
    """Hand-picked: a chunk starting mid-page after a cached prefix, a decode token at the
    first slot of a page, a full-page prompt, a one-token sequence."""
    rng = np.random.default_rng(3)
    case = make_case(rng, [9, 13, 8, 1], [3, 1, 8, 1], page_size=4, group=2, pad_seqs=2,
                     pad_tokens=3)
    for blocks in (dict(), dict(q_block=2, kv_pages=1)):
        check(attention_fn(**blocks), case)
    ref = ragged_attention_reference(*case.args())
    np.testing.assert_allclose(ragged_paged_attention_pallas(*case.args()), ref, atol=F32_TOL)


@pytest.mark.parametrize("window", [None, 6])
def test_pages_outside_the_range_are_never_read(window):
    rng = np.random.default_rng(11)
    page_size, big = 4, 10 ** 6
    # Last pages end inside a kv block (of 2 pages) and windows start past page 0.
    case = make_case(rng, [9, 13, 5, 22, 1, 30], [3, 1, 5, 7, 1, 2], page_size=page_size,
                     group=2, pad_seqs=2, pad_tokens=3)
    want = dense_answer(case, window)
    k, v, table = case.k_cache.copy(), case.v_cache.copy(), case.page_table.copy()
    for s in range(case.num_seqs):
        needed = -(-int(case.kv_lens[s]) // page_size)
        first = 0
        if window is not None:  # the first position any of its queries sees
            first_pos = int(case.kv_lens[s]) - case.q_lens[s] - window + 1
            first = max(first_pos, 0) // page_size
        for p in list(range(needed, table.shape[1])) + list(range(first)):
            k[:, table[s, p]] = np.nan
            v[:, table[s, p]] = np.nan
        table[s, needed:] = big  # any DMA of these would be out of bounds
        table[s, :first] = big
    table[case.num_seqs:] = big
    poisoned = RaggedCase(case.q, k, v, case.layer, table, case.cu_q_lens, case.kv_lens,
                          case.num_seqs, case.q_lens)
    for blocks in (dict(q_block=2, kv_pages=2), dict(q_block=8, kv_pages=3), dict()):
        out = np.asarray(attention_fn(sliding_window=window, **blocks)(*poisoned.args()))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, want, atol=F32_TOL)


def test_layer_is_traced_in_a_scan():
    """The kernel runs inside lax.scan over layers: layer is data, one compile."""
    rng = np.random.default_rng(5)
    case = fixed_case(rng, "mixed", tokens=16, seqs=3, max_len=20, page_size=4, group=2)
    args = case.args()

    @jax.jit
    def all_layers(q, kc, vc, table, cu, kvl, ns):
        def body(carry, layer):
            return carry, ragged_paged_attention_pallas(q, kc, vc, layer, table, cu, kvl, ns)
        return jax.lax.scan(body, 0, jnp.arange(kc.shape[0], dtype=jnp.int32))[1]

    outs = all_layers(args[0], args[1], args[2], *args[4:])
    for layer in range(case.k_cache.shape[0]):
        case.layer = layer
        np.testing.assert_allclose(outs[layer], dense_answer(case), atol=F32_TOL)


def test_block_sizes():
    # Decode-shaped step: one query per sequence -> the smallest sublane-aligned q block.
    assert block_sizes(64, 64, 32, 8, 128, 16, 128, jnp.bfloat16) == (4, 16)  # 4*4 = 16 rows
    assert block_sizes(64, 64, 8, 8, 128, 16, 128, jnp.float32) == (8, 16)
    # Prefill-shaped: rows fill 128 MXU rows; kv blocks of 256 tokens.
    assert block_sizes(4096, 8, 32, 8, 128, 16, 256, jnp.bfloat16) == (32, 16)
    assert block_sizes(4096, 8, 28, 4, 128, 64, 64, jnp.bfloat16) == (32, 4)  # group 7: 16 | q
    # A short page table caps the kv block; tiny page sizes still make 256-token blocks.
    assert block_sizes(512, 8, 8, 8, 128, 16, 3, jnp.float32)[1] == 3
    assert block_sizes(512, 8, 8, 8, 128, 1, 4096, jnp.float32)[1] == 256
    for args in [(8192, 4, 64, 8, 256, 128, 64, jnp.float32), (7, 3, 6, 2, 8, 4, 11, jnp.float32)]:
        qb, kvp = block_sizes(*args)
        group = args[2] // args[3]
        assert qb * group % 8 == 0 and kvp >= 1


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv(cache_dtype):
    rng = np.random.default_rng(1)
    L, pages, KV, page_size, D, T = 2, 6, 2, 4, 8, 11
    k = jnp.asarray(rng.standard_normal((L, pages, KV, page_size, D)), cache_dtype)
    v = jnp.asarray(rng.standard_normal((L, pages, KV, page_size, D)), cache_dtype)
    real = rng.choice(np.arange(page_size, pages * page_size), size=T - 3, replace=False)
    slots = jnp.asarray(np.concatenate([real, [0, 0, 0]]), jnp.int32)  # 3 padding tokens
    k_new = jnp.asarray(rng.standard_normal((T, KV, D)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((T, KV, D)), jnp.float32)
    fn = jax.jit(lambda *a: pallas_write_kv(*a, tokens_per_step=4), donate_argnums=(0, 1))
    want_k, want_v = write_kv(k, v, jnp.int32(1), slots, k_new, v_new)
    got_k, got_v = fn(k.copy(), v.copy(), jnp.int32(1), slots, k_new, v_new)
    assert got_k.dtype == cache_dtype
    np.testing.assert_array_equal(np.asarray(got_k[:, 1:]), np.asarray(want_k[:, 1:]))
    np.testing.assert_array_equal(np.asarray(got_v[:, 1:]), np.asarray(want_v[:, 1:]))
    np.testing.assert_array_equal(np.asarray(got_k[0]), np.asarray(k[0]))  # other layer
    # Page 0 of the layer: only offset 0 (the padding slot) may change.
    np.testing.assert_array_equal(np.asarray(got_k[1, 0, :, 1:]), np.asarray(k[1, 0, :, 1:]))
    assert fn._cache_size() == 1
    got_k, got_v = fn(got_k, got_v, jnp.int32(0), slots, k_new, v_new)  # layer 0, same compile
    assert fn._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(got_k[0, 1:]),
                                  np.asarray(write_kv(k, v, jnp.int32(0), slots, k_new,
                                                      v_new)[0][0, 1:]))


@pytest.mark.parametrize("dtype,page_size,group,window,tree", [
    (jnp.bfloat16, 16, 4, None, False), (jnp.float32, 16, 2, 32, False),
    (jnp.bfloat16, 64, 8, None, False), (jnp.bfloat16, 16, 4, None, True)])
def test_lowers_to_mosaic_for_tpu(monkeypatch, dtype, page_size, group, window, tree):
    """Without a TPU: Pallas' Mosaic lowering (the Python half of the TPU compile) accepts
    both kernels at TPU-like shapes (head dim 128). The Mosaic compiler itself only runs
    on a TPU. Needs a TpuInfo for this host (a private registry; skipped if it moved)."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1)
        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: info)
        tpu_info.get_tpu_info.cache_clear()  # and again after: no cached answer outlives the test
    except (ImportError, AttributeError) as e:
        pytest.skip(f"no TpuInfo registry: {e}")
    try:
        _lower_both(dtype, page_size, group, window, tree)
    finally:
        tpu_info.get_tpu_info.cache_clear()


def _lower_both(dtype, page_size, group, window, tree=False):
    rng = np.random.default_rng(0)
    case = make_case(rng, [50, 90, 1, 120], [1, 90, 1, 40], page_size=page_size, group=group,
                     dim=128)
    bits = jnp.full((case.q.shape[0],), -1, jnp.int32) if tree else None
    attn = jax.jit(lambda *a: ragged_paged_attention_pallas(*a, sliding_window=window,
                                                            interpret=False, tree_bits=bits))
    text = attn.trace(*case.args(dtype)).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    k = jnp.zeros(case.k_cache.shape, dtype)
    new = jnp.zeros((5, k.shape[2], k.shape[4]), jnp.float32)
    write = jax.jit(lambda *a: pallas_write_kv(*a, interpret=False))
    text = write.trace(k, k, jnp.int32(1), jnp.zeros((5,), jnp.int32), new, new).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("page_size,group,blocks", [(4, 3, dict(q_block=4, kv_pages=2)),
                                                    (16, 2, dict())])
def test_token_trees_see_only_their_ancestors(page_size, group, blocks):
    rng = np.random.default_rng(page_size * 7 + group)
    case = tree_case(rng, page_size=page_size, group=group)
    fn = jax.jit(lambda *a, bits: ragged_paged_attention_pallas(
        *a, interpret=EAGER, tree_bits=bits, **blocks))
    out = np.asarray(fn(*case.args(), bits=jnp.asarray(case.tree_bits)))
    np.testing.assert_allclose(out, dense_answer(case), rtol=F32_TOL, atol=F32_TOL)
