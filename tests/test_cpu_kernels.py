"""The C++ CPU kernels against their references, and in the engine (with and without)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgljax.kernels import cpu_paged_attention as kernel
from sgljax.kernels import cpu_amx_attention, cpu_amx_linear, cpu_linear
from sgljax.kernels.paged_attention import paged_attention, paged_attention_reference


def test_builds_where_a_compiler_is():
    # Without this, a broken build would pass every other test through the fallback.
    if shutil.which("c++") or shutil.which("g++"):
        assert kernel.available()
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if "avx512f" in flags:
            assert cpu_linear.available()
        if "amx_bf16" in flags:
            assert cpu_amx_linear.available() and cpu_amx_attention.available()


@pytest.mark.skipif(not cpu_linear.available(), reason="no C++ compiler or no AVX-512")
@pytest.mark.parametrize("n,k", [(576, 576), (192, 1536), (50, 37), (7, 16), (33, 100)])
def test_linear_matches_numpy(n, k):
    rng = np.random.default_rng(n * k)
    w = rng.standard_normal((3, n, k)).astype(np.float32)
    for m in (1, 3, 4, 5, 8, 16, 17, 33, 64, 70):  # every code path, with tails
        x = rng.standard_normal((k, m)).astype(np.float32)
        for layer in (0, 2):
            got = np.asarray(cpu_linear.linear(jnp.asarray(w), jnp.int32(layer), jnp.asarray(x)))
            want = w[layer].astype(np.float64) @ x
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.skipif(not cpu_amx_linear.available(), reason="no C++ compiler or no AMX")
@pytest.mark.parametrize("n,k", [(576, 576), (192, 1536), (64, 32), (32, 64)])
def test_amx_linear_matches_float64(n, k):
    rng = np.random.default_rng(n + k)
    w = jnp.asarray(rng.standard_normal((3, n, k)), jnp.bfloat16)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    for m in (1, 5, 16, 17, 32, 33, 64, 100, 130, 512):  # partial tiles; x packed by one thread or all
        x = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
        x64 = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
        for layer in (0, 2):
            got = np.asarray(cpu_amx_linear.linear(w, jnp.int32(layer), x))
            np.testing.assert_allclose(got, w64[layer] @ x64, rtol=1e-4, atol=1e-4 * np.sqrt(k))
            ref = np.asarray(cpu_amx_linear.linear_reference(w, jnp.int32(layer), x))
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.skipif(not cpu_amx_linear.available(), reason="no C++ compiler or no AMX")
def test_amx_linear_refuses_shapes_it_cannot_tile():
    assert not cpu_amx_linear.supports((2, 48, 64)) and not cpu_amx_linear.supports((2, 64, 48))
    w = jnp.zeros((1, 48, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="multiple of 32"):
        jax.block_until_ready(cpu_amx_linear.linear(w, jnp.int32(0), jnp.ones((64, 2))))
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(cpu_amx_linear.linear(jnp.zeros((1, 32, 32), jnp.bfloat16),
                                                    jnp.int32(1), jnp.ones((32, 2))))


def _case(rng, *, seqs, kv_heads, group, dim, page, pages_per_seq, layers=3):
    num_pages = 1 + seqs * pages_per_seq
    k = rng.standard_normal((layers, num_pages, kv_heads, page, dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    table = rng.permutation(np.arange(1, num_pages)).reshape(seqs, pages_per_seq)
    table = np.pad(table, ((0, 0), (0, 3))).astype(np.int32)  # padded like the engine's
    q = rng.standard_normal((seqs, 1, kv_heads * group, dim)).astype(np.float32)
    return q, k, v, table


# (kv heads, group, head dim, page size): the AVX-512 paths (page 16, dim 64 or 128)
# and the generic one.
SHAPES = [(3, 3, 64, 16), (2, 2, 128, 16), (1, 1, 64, 16), (2, 4, 32, 8), (1, 2, 16, 4)]


@pytest.mark.skipif(not kernel.available(), reason="no C++ compiler")
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kv_heads,group,dim,page", SHAPES)
def test_matches_reference(kv_heads, group, dim, page, cache_dtype):
    rng = np.random.default_rng(dim + page)
    pages_per_seq = 5
    q, k, v, table = _case(rng, seqs=6, kv_heads=kv_heads, group=group, dim=dim, page=page,
                           pages_per_seq=pages_per_seq)
    # A 16-bit cache is read widened to float32: the reference gets the widened values,
    # and the pure-JAX path the 16-bit cache itself under float32 queries.
    k16, v16 = jnp.asarray(k, cache_dtype), jnp.asarray(v, cache_dtype)
    k, v = np.asarray(k16.astype(jnp.float32)), np.asarray(v16.astype(jnp.float32))
    full = pages_per_seq * page
    # Lengths on and off page edges; a padded row (length 1 on page 0, as the engine
    # pads); a query that sees less than its sequence holds (position < length - 1).
    kv_lens = np.asarray([1, page, page + 1, full, full - 3, 1], np.int32)
    positions = (kv_lens - 1)[:, None].astype(np.int32)
    positions[4, 0] = page + 2
    table[5] = 0
    for layer in (0, 2):
        want = paged_attention_reference(q, k, v, jnp.int32(layer), table, positions, kv_lens)
        got = kernel.cpu_paged_attention(jnp.asarray(q), k16, v16, jnp.int32(layer), table,
                                          jnp.asarray(positions), jnp.asarray(kv_lens))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
        if cache_dtype != "float32":
            pure = paged_attention(jnp.asarray(q), k16, v16, jnp.int32(layer), table,
                                   jnp.asarray(positions), jnp.asarray(kv_lens))
            assert pure.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(pure), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not kernel.available(), reason="no C++ compiler")
@pytest.mark.parametrize("kv_heads,group,dim,page", SHAPES)
def test_prefill_chunks_match_reference(kv_heads, group, dim, page):
    """Several query tokens per sequence: fresh prompts, chunks after a cached prefix,
    and padded query rows (position 0), as the engine packs a prefill step."""
    rng = np.random.default_rng(7 * dim + page)
    pages_per_seq = 6
    q1, k, v, table = _case(rng, seqs=4, kv_heads=kv_heads, group=group, dim=dim, page=page,
                            pages_per_seq=pages_per_seq)
    qn = 2 * page + 3
    q = rng.standard_normal((4, qn) + q1.shape[2:]).astype(np.float32)
    chunk = [qn, qn - 5, 1, 9]  # tokens of each sequence in this step
    kv_lens = np.asarray([qn, 4 * page, 2 * page + 1, pages_per_seq * page], np.int32)
    positions = np.zeros((4, qn), np.int32)
    for i, (n, kv) in enumerate(zip(chunk, kv_lens)):
        positions[i, :n] = np.arange(kv - n, kv)
    want = np.asarray(paged_attention_reference(q, k, v, jnp.int32(1), table, positions, kv_lens))
    got = np.asarray(kernel.cpu_paged_attention(jnp.asarray(q), k, v, jnp.int32(1), table,
                                                jnp.asarray(positions), jnp.asarray(kv_lens)))
    for i, n in enumerate(chunk):  # rows past a sequence's chunk are padding
        np.testing.assert_allclose(got[i, :n], want[i, :n], rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not kernel.available(), reason="no C++ compiler")
def test_bad_page_id_is_an_error_not_a_wild_read():
    rng = np.random.default_rng(0)
    q, k, v, table = _case(rng, seqs=2, kv_heads=1, group=1, dim=64, page=16, pages_per_seq=2)
    table[1, 0] = k.shape[1]  # one past the pool
    lens = np.asarray([20, 20], np.int32)
    with pytest.raises(Exception, match="page id out of range"):
        jax.block_until_ready(kernel.cpu_paged_attention(
            jnp.asarray(q), k, v, jnp.int32(0), table, jnp.asarray(lens[:, None] - 1), lens))


@pytest.mark.skipif(not kernel.available(), reason="no C++ compiler")
@pytest.mark.parametrize("dtype,kv_dtype", [("float32", "auto"), ("bfloat16", "auto"),
                                            ("float32", "float16"), ("bfloat16", "float16")])
def test_engine_uses_it_and_decodes_the_same(tiny_models, monkeypatch, dtype, kv_dtype):
    from sgljax.engine.engine import Engine
    from sgljax.engine.sampling_params import SamplingParams

    prompts = [[5, 9, 13, 200 + i] * (3 + 4 * i) for i in range(5)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True,
                            top_logprobs=2)

    def run():
        engine = Engine(model_path=str(tiny_models["qwen3"]), dtype=dtype,
                        kv_cache_dtype=kv_dtype, max_running_requests=8,
                        context_length=256, max_total_tokens=4096, page_size=16)
        outs = engine.generate(prompts, params)
        runner = engine.runner
        assert runner.k_cache.dtype == (jnp.float16 if kv_dtype == "float16" else jnp.float32)
        return (runner.attention_kernel, runner.linear_kernel), outs

    used, with_kernel = run()
    assert used[0] is not None
    matmul = cpu_linear if dtype == "float32" else cpu_amx_linear
    assert (used[1] is not None) == matmul.available()
    if dtype == "bfloat16" and cpu_amx_attention.available():
        assert used[0].chunk is cpu_amx_attention.amx_attention
        assert used[0].decode is kernel.cpu_paged_attention
    kernel.cpu_build.load.cache_clear()
    monkeypatch.setenv("SGLJAX_DISABLE_CPU_KERNELS", "1")
    try:
        unused, without = run()
    finally:
        kernel.cpu_build.load.cache_clear()
    # Without kernels: XLA's dots, and pure-JAX attention (bf16 products for bf16 weights).
    assert unused[1] is None
    assert unused[0] is None if dtype == "float32" else unused[0].chunk.func is paged_attention
    if dtype == "float32":
        assert [o["token_ids"] for o in with_kernel] == [o["token_ids"] for o in without]
    else:  # bf16 rounding of intermediates can break a near tie the other way
        for a, b in zip(with_kernel, without):
            _same_until_a_near_tie(a, b, tol=0.02)


def _same_until_a_near_tie(a, b, tol):
    """Greedy outputs a and b agree token for token with logprobs within tol, or until
    a step whose two best tokens (in a) were within tol of each other."""
    ids_a, ids_b = a["token_ids"], b["token_ids"]
    part = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), len(ids_a))
    np.testing.assert_allclose(a["logprobs"][:part], b["logprobs"][:part], atol=tol)
    if part < len(ids_a):
        (first, lp1), (second, lp2) = a["top_logprobs"][part][:2]
        assert {first, second} == {ids_a[part], ids_b[part]} and lp1 - lp2 < tol
