"""Ragged steps on a tiny model: decodes are never stalled by prompts, and every
attention backend gives the same greedy tokens."""

import numpy as np
import pytest

from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(path, **kw):
    args = dict(model_path=str(path), page_size=4, chunked_prefill_size=16,
                max_running_requests=8, context_length=256, max_total_tokens=4096)
    args.update(kw)
    return Engine(**args)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150000, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_long_prompt_never_stalls_running_decodes(tiny_models, overlap):
    eng = _engine(tiny_models["qwen3"], disable_overlap_schedule=not overlap)
    short = [eng.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
             for p in _prompts([5, 9, 3])]
    while not all(s.output_ids for s in short):
        eng.step()
    long = eng.add_request(_prompts([90], seed=1)[0], GREEDY)  # six chunks of 16 or fewer
    while eng.has_work():
        eng.step()
    log = eng.step_log()
    mixed = 0
    for rec in log:
        # Every sequence decoding when the step was chosen is in it, among its decode rows.
        assert set(rec.decoding) <= set(rec.rids[:rec.num_decodes]), rec
        assert all(n == 1 for n in rec.chunk_lens[:rec.num_decodes])
        assert sum(rec.chunk_lens) <= 16
        if long.rid in rec.rids[rec.num_decodes:] and rec.num_decodes:
            mixed += 1
    assert mixed >= 5  # the long prompt's chunks ran beside the decodes
    alone = _engine(tiny_models["qwen3"], disable_radix_cache=True)
    assert alone.generate([long.prompt_ids], GREEDY)[0]["token_ids"] == long.output_ids


def test_decode_and_prefill_rows_in_one_step_match_running_alone(tiny_models):
    """Prompts arriving one a step while others decode: every output as if alone."""
    prompts = _prompts([3, 40, 17, 1, 29, 8], seed=2)
    alone = _engine(tiny_models["llama"], disable_radix_cache=True)
    expected = [alone.generate([p], GREEDY)[0]["token_ids"] for p in prompts]
    eng = _engine(tiny_models["llama"], disable_radix_cache=True)
    seqs = []
    for p in prompts:
        seqs.append(eng.add_request(p, GREEDY))
        eng.step()
    while eng.has_work():
        eng.step()
    assert [s.output_ids for s in seqs] == expected
    assert any(0 < r.num_decodes < len(r.rids) for r in eng.step_log())


def test_every_attention_backend_gives_the_same_greedy_tokens(tiny_models):
    """native (pure JAX), pallas (the TPU kernels, interpreted here) and cpu (C++): one
    short run of mixed lengths, page-crossing, with decodes beside prompt chunks."""
    prompts = _prompts([11, 3, 26], seed=3)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("native", "pallas", "cpu"):
        eng = _engine(tiny_models["qwen3"], attention_backend=backend, disable_radix_cache=True)
        assert eng.runner.kernels.backend == backend
        outs[backend] = [o["token_ids"] for o in eng.generate(prompts, params)]
    assert outs["pallas"] == outs["native"] == outs["cpu"]
    assert all(len(t) == 5 for t in outs["native"])


def test_kernels_run_per_shard_under_tensor_parallelism():
    """A kernel is no op XLA can partition: over a tp mesh each shard runs it on its own
    heads (over_kv_heads, which the pallas backend uses on a TPU mesh). Checked here with
    the native functions inside, against the same functions partitioned by XLA."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ragged_cases import dense_answer, make_case
    from sgljax.engine.attention_backend import over_kv_heads
    from sgljax.engine.mesh import make_mesh
    from sgljax.kernels.paged_attention import ragged_paged_attention, write_kv

    mesh = make_mesh(2)
    rng = np.random.default_rng(5)
    case = make_case(rng, [9, 30, 4], [9, 1, 2], page_size=4, kv_heads=2, group=2)
    q, kc, vc, *rest = case.args()
    heads, cache = NamedSharding(mesh, P(None, "tp", None)), NamedSharding(mesh, P(None, None, "tp"))
    q, kc, vc = jax.device_put(q, heads), jax.device_put(kc, cache), jax.device_put(vc, cache)
    with jax.set_mesh(mesh):
        out = jax.jit(over_kv_heads(ragged_paged_attention, mesh))(q, kc, vc, *rest)
        np.testing.assert_allclose(np.asarray(out), dense_answer(case), rtol=2e-5, atol=2e-5)
        new = jax.device_put(rng.standard_normal((4, 2, 8)).astype(np.float32), heads)
        slots = jnp.asarray([5, 9, 0, 13], jnp.int32)
        got = jax.jit(over_kv_heads(write_kv, mesh, 2))(kc, vc, jnp.int32(1), slots, new, -new)
        want = write_kv(kc, vc, jnp.int32(1), slots, new, -new)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pallas_on_a_cpu_mesh_is_refused(tiny_models):
    with pytest.raises(ValueError, match="interpreted on one CPU device"):
        _engine(tiny_models["qwen3"], tp_size=2, attention_backend="pallas")
