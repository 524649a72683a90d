"""The C++ CPU kernels against their references, and in the engine (with and without)."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgljax.kernels import cpu_paged_attention as kernel
from sgljax.kernels import cpu_amx_attention, cpu_amx_linear, cpu_bf16_linear, cpu_linear
from sgljax.kernels.paged_attention import ragged_paged_attention
from ragged_cases import dense_answer, make_case, random_case, tree_case


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
        if "avx512_bf16" in flags:
            assert cpu_bf16_linear.available()


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


@pytest.mark.skipif(not cpu_bf16_linear.available(), reason="no C++ compiler or no AVX512-BF16")
@pytest.mark.parametrize("n,k", [(576, 576), (192, 1536), (50, 37), (7, 16), (33, 100)])
def test_bf16_linear_matches_float64(n, k):
    rng = np.random.default_rng(n + 3 * k)
    w = jnp.asarray(rng.standard_normal((3, n, k)), jnp.bfloat16)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    for m in (1, 3, 4, 5, 16, 17, 64, 130):  # token groups of 4 with tails; K not a multiple of 32
        x = jnp.asarray(rng.standard_normal((k, m)), jnp.float32)
        x64 = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
        for layer in (0, 2):
            got = np.asarray(cpu_bf16_linear.linear(w, jnp.int32(layer), x))
            np.testing.assert_allclose(got, w64[layer] @ x64, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@pytest.mark.skipif(not cpu_amx_linear.available(), reason="no C++ compiler or no AMX")
def test_amx_linear_refuses_shapes_it_cannot_tile():
    assert not cpu_amx_linear.supports((2, 48, 64)) and not cpu_amx_linear.supports((2, 64, 48))
    w = jnp.zeros((1, 48, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="multiple of 32"):
        jax.block_until_ready(cpu_amx_linear.linear(w, jnp.int32(0), jnp.ones((64, 2))))
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(cpu_amx_linear.linear(jnp.zeros((1, 32, 32), jnp.bfloat16),
                                                    jnp.int32(1), jnp.ones((32, 2))))


def _widened(case, cache_dtype):
    """The case with its caches rounded to cache_dtype (and back to float32, for the
    dense answer), and the 16-bit caches the kernel reads."""
    k16 = jnp.asarray(case.k_cache, cache_dtype)
    v16 = jnp.asarray(case.v_cache, cache_dtype)
    wide = dataclasses.replace(case, k_cache=np.asarray(k16.astype(jnp.float32)),
                               v_cache=np.asarray(v16.astype(jnp.float32)))
    return wide, k16, v16


def _run(case, k=None, v=None, **kw):
    q, kc, vc, *rest = case.args()
    return np.asarray(kernel.cpu_paged_attention(
        jnp.asarray(q), kc if k is None else k, vc if v is None else v, *rest, **kw))


# (page size, group, head dim): the AVX-512 paths (head dim 32, 64, 128; any page size,
# in bands of 16 keys) and the generic one (other head dims).
SHAPES = [(16, 3, 64), (16, 2, 128), (1, 1, 32), (4, 4, 64), (32, 8, 64), (64, 1, 128),
          (8, 2, 8), (3, 3, 48)]
needs_kernel = pytest.mark.skipif(not kernel.available(), reason="no C++ compiler")


@needs_kernel
@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("page,group,dim", SHAPES)
def test_matches_dense_answer(kind, page, group, dim):
    """Random ragged steps (several seeds, lengths across page edges, prefix-cached
    chunks, padding sequences and tokens) against the float64 answer."""
    rng = np.random.default_rng(page * 1000 + group * 10 + dim)
    for _ in range(3):
        case = random_case(rng, page_size=page, group=group, kind=kind, dim=dim,
                           max_len=3 * page + 20, kv_heads=int(rng.integers(1, 4)))
        got = _run(case)
        np.testing.assert_allclose(got, dense_answer(case), rtol=2e-5, atol=2e-5)
        assert not got[case.num_real_tokens:].any()  # padding tokens: zeros


@needs_kernel
@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("page,group,dim", [SHAPES[0], SHAPES[3], SHAPES[6]])
def test_16_bit_caches_are_read_widened(cache_dtype, page, group, dim):
    rng = np.random.default_rng(dim + page)
    for kind in ("decode", "mixed"):
        wide, k16, v16 = _widened(random_case(rng, page_size=page, group=group, kind=kind,
                                              dim=dim, max_len=50), cache_dtype)
        np.testing.assert_allclose(_run(wide, k16, v16), dense_answer(wide), rtol=2e-5,
                                   atol=2e-5)


@needs_kernel
def test_lengths_on_and_off_page_edges():
    """Every length from 1 to 3 pages + 1, as decode tokens, whole prompts and chunks
    after a cached prefix (the chunk crossing a page edge), in one step."""
    rng = np.random.default_rng(5)
    page = 16
    kv = list(range(1, 3 * page + 2))
    q_lens = [[1, n, max(1, n // 3)][n % 3] for n in kv]
    case = make_case(rng, kv, q_lens, page_size=page, kv_heads=3, group=3, dim=64)
    np.testing.assert_allclose(_run(case), dense_answer(case), rtol=2e-5, atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("window", [1, 5, 17, 40])
def test_sliding_window(window):
    rng = np.random.default_rng(window)
    for page, dim in ((16, 64), (4, 8)):
        case = random_case(rng, page_size=page, group=2, kind="mixed", dim=dim, max_len=60)
        np.testing.assert_allclose(_run(case, sliding_window=window),
                                   dense_answer(case, sliding_window=window), rtol=2e-5,
                                   atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("page,group,dim", [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[6]])
def test_bf16_products_match_the_reference(cache_dtype, page, group, dim):
    """bf16_products against ragged_paged_attention(bf16_products=True): the same
    roundings, but each probability is rounded against the running max of its block
    (128 keys there, 16 here), so not bit for bit."""
    rng = np.random.default_rng(3 * page + dim)
    for kind in ("decode", "prefill", "mixed"):
        case = random_case(rng, page_size=page, group=group, kind=kind, dim=dim, max_len=150)
        wide, k16, v16 = _widened(case, cache_dtype)
        got = _run(wide, k16, v16, bf16_products=True)
        args = (jnp.asarray(wide.q), k16, v16) + tuple(map(jnp.asarray, wide.args()[3:]))
        want = np.asarray(ragged_paged_attention(*args, bf16_products=True))
        np.testing.assert_allclose(got, want, rtol=0, atol=6e-3)
        np.testing.assert_allclose(got, dense_answer(wide), rtol=0, atol=4e-2)
        assert not got[case.num_real_tokens:].any()


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
def test_decode_and_prefill_agree(bf16):
    """A token gives the same output as a decode token and inside a prefill chunk (the
    engine relies on this for bfloat16 models)."""
    rng = np.random.default_rng(11)
    chunk = make_case(rng, [70], [20], page_size=16, kv_heads=3, group=3, dim=64,
                      pad_seqs=0, pad_tokens=0)
    last = dataclasses.replace(chunk, q=chunk.q[-1:], cu_q_lens=np.asarray([0, 1], np.int32),
                               q_lens=[1])
    for dtype in ("float32", "float16"):
        _, k16, v16 = _widened(chunk, dtype)
        np.testing.assert_allclose(_run(last, k16, v16, bf16_products=bf16)[0],
                                   _run(chunk, k16, v16, bf16_products=bf16)[-1],
                                   rtol=1e-6, atol=1e-6)


@needs_kernel
def test_under_jit_with_16_bit_queries():
    rng = np.random.default_rng(2)
    case = random_case(rng, page_size=16, group=3, kind="mixed", dim=64)
    q, *rest = case.args()
    fn = jax.jit(kernel.cpu_paged_attention, static_argnames=("bf16_products", "sliding_window"))
    got = fn(jnp.asarray(q, jnp.bfloat16), *map(jnp.asarray, rest))
    assert got.dtype == jnp.bfloat16 and got.shape == q.shape
    bf_case = dataclasses.replace(case, q=np.asarray(jnp.asarray(q, jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), dense_answer(bf_case),
                               rtol=2**-7, atol=2**-7)


@needs_kernel
def test_bad_arguments_are_errors_not_wild_reads():
    rng = np.random.default_rng(0)
    case = make_case(rng, [20, 9], [1, 4], page_size=16, kv_heads=1, group=2, dim=64)
    q, k, v, layer, table, cu, kv_lens, num_seqs = case.args()

    def call(**change):
        a = dict(q=q, k=k, v=v, layer=layer, table=table, cu=cu, kv_lens=kv_lens,
                 num_seqs=num_seqs)
        a.update(change)
        return jax.block_until_ready(kernel.cpu_paged_attention(*a.values()))

    call()
    bad = table.copy()
    bad[1, 0] = k.shape[1]  # one past the pool
    with pytest.raises(Exception, match="page id out of range"):
        call(table=bad)
    with pytest.raises(Exception, match="kv_lens past the page table"):
        call(kv_lens=np.asarray([20, 16 * table.shape[1] + 1, 0], np.int32))
    with pytest.raises(Exception, match="layer out of range"):
        call(layer=np.int32(k.shape[0]))
    with pytest.raises(Exception, match="num_seqs out of range"):
        call(num_seqs=np.int32(4))
    with pytest.raises(Exception, match="cu_q_lens past the query tokens"):
        call(cu=np.asarray([0, 1, q.shape[0] + 1, q.shape[0] + 1], np.int32))
    with pytest.raises(Exception, match="must not fall"):
        call(cu=np.asarray([0, 3, 2, 2], np.int32))
    with pytest.raises(Exception, match="more query tokens than kv_lens"):
        call(kv_lens=np.asarray([20, 3, 0], np.int32))
    with pytest.raises(Exception, match="mismatched shapes"):
        call(kv_lens=kv_lens[:2])


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
        return (runner.kernels, runner.linear_kernel), outs

    used, with_kernel = run()
    assert used[0].backend == "cpu"
    matmuls = [cpu_linear] if dtype == "float32" else [cpu_amx_linear, cpu_bf16_linear]
    assert (used[1] is not None) == any(m.available() for m in matmuls)
    vector = used[0].attention
    if dtype == "bfloat16" and cpu_amx_attention.available():
        assert vector.chunk is cpu_amx_attention.amx_attention
        vector = vector.decode
    assert vector.func is kernel.cpu_paged_attention
    assert vector.keywords == {"bf16_products": dtype == "bfloat16"}
    kernel.cpu_build.load.cache_clear()
    monkeypatch.setenv("SGLJAX_DISABLE_CPU_KERNELS", "1")
    try:
        unused, without = run()
    finally:
        kernel.cpu_build.load.cache_clear()
    # Without kernels: XLA's dots, and pure-JAX attention (bf16 products for bf16 weights).
    assert unused[1] is None and unused[0].backend == "native"
    if dtype == "float32":
        assert unused[0].attention is ragged_paged_attention
    else:
        assert unused[0].attention.func is ragged_paged_attention
        assert unused[0].attention.keywords == {"bf16_products": True}
    if dtype == "float32":
        assert [o["token_ids"] for o in with_kernel] == [o["token_ids"] for o in without]
        # The kernel computes LM heads of several rows (these decode 5 at a time), XLA one row.
        assert used[1].takes_head(8) and not used[1].takes_head(1)
        for a, b in zip(with_kernel, without):
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4)
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


@needs_kernel
@pytest.mark.parametrize("page,group,dim", [(16, 3, 64), (4, 2, 8), (1, 1, 32)])
def test_token_trees_see_only_their_ancestors(page, group, dim):
    """Verify rows of token trees (tree_bits) beside decode tokens and a prompt chunk."""
    rng = np.random.default_rng(page + group + dim)
    for _ in range(2):
        case = tree_case(rng, page_size=page, group=group, dim=dim)
        got = _run(case, tree_bits=jnp.asarray(case.tree_bits))
        np.testing.assert_allclose(got, dense_answer(case), rtol=2e-5, atol=2e-5)
