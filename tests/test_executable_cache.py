"""The per-rank executable cache: restarts load every bucket, on every rank, and never crash."""

import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_multihost as mh
from sgljax.engine.executable_cache import ExecutableCache

# A fresh process warms a small bucket plan, generates greedily, and prints its figures.
WARM_AND_GENERATE = """
import json, sys
from sgljax.engine.engine import Engine
from sgljax.engine.sampling_params import SamplingParams
eng = Engine(model_path=sys.argv[1], compilation_cache_dir=sys.argv[2], page_size=4,
             chunked_prefill_size=16, max_running_requests=4, max_prefill_seqs=1,
             precompile_bs_paddings=[4], context_length=64, max_total_tokens=512)
cache, stats = eng.runner.executable_cache, eng.compile_stats
xla0 = stats.compiles
buckets = eng.warmup()
xla_in_warmup = stats.compiles - xla0
out = eng.generate([[11, 22, 33, 44, 55], list(range(100, 121))],
                   SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
print(json.dumps(dict(buckets=buckets, hits=cache.hits, jax_hits=cache.jax_hits,
                      compiled=cache.compiled, xla_in_warmup=xla_in_warmup,
                      after_warmup=eng.compiles_since_warmup(),
                      tokens=[o["token_ids"] for o in out])))
"""


def _warm_in_fresh_process(model, cache_dir) -> dict:
    out = subprocess.run([sys.executable, "-c", WARM_AND_GENERATE, str(model), str(cache_dir)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_restart_loads_every_bucket_and_compiles_nothing(tiny_models, tmp_path):
    first = _warm_in_fresh_process(tiny_models["qwen3"], tmp_path)
    second = _warm_in_fresh_process(tiny_models["qwen3"], tmp_path)
    n = first["buckets"]
    assert n > 1 and second["buckets"] == n
    assert (first["hits"], first["compiled"]) == (0, n)
    assert (second["hits"], second["jax_hits"], second["compiled"]) == (n, 0, 0)
    assert second["xla_in_warmup"] == 0  # loading is not compiling
    assert second["after_warmup"] == 0
    assert second["tokens"] == first["tokens"]
    assert len(list((tmp_path / "sgljax-executables" / "rank0").glob("*.bin"))) == n


def test_follower_loads_its_own_buckets_on_restart(tiny_models, tmp_path):
    """JAX writes its persistent cache from process 0 only: rank 1 must hit its own files."""
    def run_two_hosts():
        port = mh._free_port()
        procs = [mh._start(tiny_models["qwen3"], r, port, 6, tmp_path) for r in (0, 1)]
        try:
            outs = [p.communicate(timeout=400) for p in procs]
        finally:
            mh._kill(*procs)
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        lines = [line for out, _ in outs for line in out.splitlines()]
        figures = {f["rank"]: f for f in (json.loads(line[6:]) for line in lines
                                          if line.startswith("CACHE "))}
        tokens = json.loads(next(line for line in lines if line.startswith("TOKENS "))[7:])
        return figures, tokens

    first, tokens1 = run_two_hosts()
    second, tokens2 = run_two_hosts()
    n = first[1]["compiled"]
    assert n > 1 and first[0]["compiled"] == n  # each rank compiled every bucket once
    for rank in (0, 1):
        assert second[rank]["hits"] == n, second
        assert second[rank]["compiled"] == second[rank]["jax_hits"] == 0, second
        assert second[rank]["after_warmup"] == 0
    assert tokens2 == tokens1
    assert len(list((tmp_path / "sgljax-executables" / "rank1").glob("*.bin"))) == n


# -- in process: a small jitted function, no engine ------------------------------------------

def _lowered(salt: float, devices=None):
    """A program no other test compiles (``salt`` is baked in), so JAX's cache cannot have it."""
    mesh = jax.make_mesh((1,), ("tp",), devices=(devices or jax.devices())[:1])
    f = jax.jit(lambda x: jnp.cumsum(jnp.arange(37.0) * x) + salt)
    return mesh, f.lower(jnp.ones(37, jnp.float32)), f


def _corrupt(path, how):
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[:len(blob) // 2])
    elif how == "flipped byte":
        path.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    else:  # a valid header over a payload that is not an executable
        import hashlib
        from sgljax.engine import executable_cache as ec
        payload = b"not zlib at all"
        path.write_bytes(ec._MAGIC + hashlib.sha256(payload).digest() + payload)


@pytest.mark.parametrize("salt, how", [(0.25, "truncated"), (0.5, "flipped byte"),
                                       (0.75, "garbage payload")])
def test_a_corrupt_entry_is_dropped_and_recompiled(tmp_path, caplog, salt, how):
    mesh, lowered, f = _lowered(salt)
    expected = np.asarray(f(jnp.ones(37, jnp.float32)))
    first = ExecutableCache(tmp_path, mesh)
    first.load_or_compile(lowered)
    files = list(first.dir.glob("*.bin"))
    assert first.compiled == 1 and len(files) == 1
    _corrupt(files[0], how)
    again = ExecutableCache(tmp_path, mesh)
    with caplog.at_level(logging.WARNING, logger="sgljax.engine.executable_cache"):
        exe = again.load_or_compile(lowered)
    assert "dropping unusable cached executable" in caplog.text
    assert (again.hits, again.misses) == (0, 1)
    np.testing.assert_allclose(np.asarray(exe(jnp.ones(37, jnp.float32))), expected)
    third = ExecutableCache(tmp_path, mesh)  # the entry was replaced or removed, not kept broken
    exe = third.load_or_compile(lowered)
    np.testing.assert_allclose(np.asarray(exe(jnp.ones(37, jnp.float32))), expected)


def test_a_stored_executable_loads_and_runs_on_its_devices(tmp_path):
    """Sharded over two of the four devices, in reverse order: the load must place it alike."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    devices = jax.devices()
    mesh = jax.make_mesh((2,), ("tp",), axis_types=(AxisType.Auto,),
                         devices=[devices[3], devices[2]])
    sharding = NamedSharding(mesh, P("tp"))
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.5, out_shardings=sharding)
    x = jax.device_put(jnp.arange(38.0, dtype=jnp.float32), sharding)
    cache = ExecutableCache(tmp_path, mesh)
    cache.load_or_compile(f.lower(x))
    assert cache.compiled == 1
    again = ExecutableCache(tmp_path, mesh)
    exe = again.load_or_compile(f.lower(x))
    assert (again.hits, again.misses) == (1, 0)
    y = exe(x)
    assert y.sharding.device_set == {devices[2], devices[3]}
    np.testing.assert_allclose(np.asarray(y), np.sin(np.arange(38.0)) * 3.0 + 1.5, rtol=1e-6)


def test_other_devices_never_share_a_key(tmp_path):
    devices = jax.devices()
    assert len(devices) >= 2, "conftest gives 4 CPU devices"
    mesh_a, lowered_a, _ = _lowered(2.0, devices[:1])
    mesh_b, lowered_b, _ = _lowered(2.0, devices[1:2])
    assert ExecutableCache(tmp_path, mesh_a).key(lowered_a) != ExecutableCache(
        tmp_path, mesh_b).key(lowered_b)


def test_pool_size_does_not_follow_free_memory(monkeypatch):
    """The KV pool's size is in every step's shape: a restart must not change it needlessly.

    It comes from total memory; free memory only caps it when the machine is short."""
    from types import SimpleNamespace

    from sgljax.engine import args as args_mod

    total = 24 * 2**30

    def pages_with(available):
        monkeypatch.setattr(args_mod.psutil, "virtual_memory",
                            lambda: SimpleNamespace(total=total, available=available))
        return args_mod.EngineArgs(max_running_requests=64).resolve_num_pages(737280, 256)

    sizes = {pages_with(int(total * f)) for f in (0.4, 0.5, 0.7, 0.9)}
    assert len(sizes) == 1, sizes
    exact = int(total * 0.25 // 737280) + 1
    assert exact * 0.875 <= sizes.pop() <= exact
    assert pages_with(int(total * 0.1)) < exact * 0.5  # short of memory: the cap wins


def test_an_unwritable_cache_only_costs_time(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    mesh, lowered, f = _lowered(3.0)
    cache = ExecutableCache(blocker, mesh)
    with caplog.at_level(logging.WARNING, logger="sgljax.engine.executable_cache"):
        exe = cache.load_or_compile(lowered)
        cache.load_or_compile(_lowered(3.5)[1])
    assert cache.compiled == 2
    assert caplog.text.count("cannot store executable") == 1
    x = jnp.ones(37, jnp.float32)
    np.testing.assert_allclose(np.asarray(exe(x)), np.asarray(f(x)))
