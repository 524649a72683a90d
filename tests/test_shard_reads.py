"""Each host reads only the weight slices its devices hold, and gets the same parameters."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgljax.engine import checkpoint
from sgljax.engine.convert import convert_model
from sgljax.engine.loader import load_model
from sgljax.engine.mesh import make_mesh
from sgljax.engine.params import kv_heads_for
from sgljax.engine.weights import WeightsError, engine_tensors, safetensors_getter

WORKER = str(Path(__file__).parent / "shard_load_worker.py")


def _whole_tensor_params(path, cfg, tp, dtype):
    """The engine parameters as the loader built them before slicing: every tensor read whole."""
    return dict(engine_tensors(cfg, safetensors_getter(path), kv_heads_for(cfg, tp), dtype))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_sliced_reads_equal_whole_reads(arch, tiny_models):
    """Bit-equal at every TP, incl. TP > KV heads (tp=4), q/k/v bias (qwen2), tied embeddings."""
    for tp in (1, 2, 4):
        loaded = load_model(str(tiny_models[arch]), make_mesh(tp))
        flat = dict(nnx.to_flat_state(nnx.state(loaded.model)))
        for name, want in _whole_tensor_params(loaded.path, loaded.config, tp, np.float32).items():
            got = flat[tuple(name.split("."))].get_value()
            assert got.shape == want.shape, name
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{name} tp={tp}")
        # One process holds every device: it reads each source tensor once (KV heads
        # repeated for tp=4 are read once per copy).
        assert loaded.bytes_read >= loaded.bytes_total


def test_sliced_reads_cast_to_bfloat16(tiny_models):
    loaded = load_model(str(tiny_models["qwen2"]), make_mesh(2), dtype="bfloat16")
    flat = dict(nnx.to_flat_state(nnx.state(loaded.model)))
    for name, want in _whole_tensor_params(loaded.path, loaded.config, 2, jnp.bfloat16).items():
        got = flat[tuple(name.split("."))].get_value()
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)


def test_missing_and_misshapen_tensors_fail_before_reading(tiny_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tiny_models["llama"]
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="1 tensor\\(s\\) missing: model.layers.1.mlp.up_proj"):
        load_model(str(tmp_path), make_mesh(1))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="up_proj.weight: shape \\(3, 3\\)"):
        load_model(str(tmp_path), make_mesh(1))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(model, reference=None):
    """Run the load worker on two processes of 2 CPU devices each; their RESULT dicts."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = [str(model)] + ([str(reference)] if reference else [])
    procs = [subprocess.Popen([sys.executable, WORKER, args[0], str(r), str(port), *args[1:]],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in (0, 1)]
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-2000:]
            results.append(json.loads(next(l for l in out.splitlines()
                                           if l.startswith("RESULT "))[7:]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _split_and_replicated(result):
    params = result["params"]
    split = sum(p["source_bytes"] for p in params.values() if p["split"])
    replicated = sum(p["source_bytes"] for p in params.values() if not p["split"])
    kv = sum(params[f"layers.{n}"]["source_bytes"] for n in ("k_proj", "v_proj"))
    return split, replicated, kv


def test_two_hosts_each_read_about_half(tiny_models):
    """tp=4 over two processes of 2 CPU devices: each reads half of every split tensor plus
    the replicated ones, and its shards equal the whole-tensor read exactly."""
    for r in _two_hosts(tiny_models["qwen3"]):
        assert r["local_devices"] == 2
        assert r["mismatched"] == []
        split, replicated, kv = _split_and_replicated(r)
        assert r["bytes_total"] == split + replicated
        # The tiny model has 2 KV heads and tp=4 repeats them: both of a host's devices hold
        # a copy of the same source head, and each reads it (see engine/shard_reads.py).
        assert split / 2 + replicated <= r["bytes_read"] <= split / 2 + replicated + kv / 2
        assert r["bytes_read"] < 0.55 * r["bytes_total"]


def test_two_hosts_restore_only_their_chunks(tiny_models, tmp_path):
    """A checkpoint converted at tp=4 holds 4 chunks per split tensor: each host's restore
    reads (as TensorStore counts) about half, and its shards equal the HF folder's."""
    out = tmp_path / "converted"
    convert_model(tiny_models["qwen3"], out, tp_size=4)
    for r in _two_hosts(out, reference=tiny_models["qwen3"]):
        assert r["mismatched"] == []
        split, replicated, kv = _split_and_replicated(r)
        assert r["bytes_total"] == split + replicated
        # Stored KV heads (2) are fewer than tp: restore reads them whole and repeats them.
        # Slack for Orbax's metadata and the OCDBT manifests.
        assert split / 2 + replicated <= r["bytes_read"] <= split / 2 + replicated + kv + (1 << 20)
        assert r["bytes_read"] < 0.55 * r["bytes_total"]


def test_convert_writes_tp_chunks_without_that_many_devices(tiny_models, tmp_path):
    """`sgljax convert --tp-size 4` in a process with one CPU device still writes every split
    tensor in 4 chunks along its TP axis (what lets each host read only its part)."""
    import orbax.checkpoint as ocp

    out = tmp_path / "converted"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    proc = subprocess.run([sys.executable, "-m", "sgljax.cli.main", "convert",
                           str(tiny_models["qwen3"]), str(out), "--tp-size", "4"],
                          env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = ocp.PyTreeCheckpointer().metadata(out / checkpoint.CHECKPOINT_DIR / checkpoint.STATE_DIR)
    tree = meta.item_metadata.tree
    assert tree["embed"].storage.chunk_shape == (151680 // 4, 64)
    assert tree["lm_head"].storage.chunk_shape == (151680 // 4, 64)
    assert tree["layers"]["q_proj"].storage.chunk_shape[1] == 128 // 4
    assert tree["layers"]["down_proj"].storage.chunk_shape[2] == 128 // 4
