"""`sgljax convert`: converted checkpoints serve exactly what their source serves, at any TP;
conversion streams (bounded memory) and is atomic (a killed run is never loaded)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from sgljax.cli.main import app
from sgljax.engine import checkpoint
from sgljax.engine.convert import convert_model
from sgljax.engine.engine import Engine
from sgljax.engine.default_model import default_gguf
from sgljax.engine.loader import load_model
from sgljax.engine.model_files import resolve_model_path
from sgljax.engine.mesh import make_mesh
from sgljax.engine.sampling_params import SamplingParams
from big_model import build_big_model

ARCHS = ["qwen3", "llama"]
LOGPROB_TOL = 1e-5


def _engine(path, tp=1, dtype="float32"):
    # Sized so a run compiles two shapes only (one prefill, one decode): tests stay quick.
    return Engine(model_path=str(path), tp_size=tp, dtype=dtype, page_size=16,
                  chunked_prefill_size=32, max_running_requests=2, max_prefill_seqs=2,
                  context_length=64, max_total_tokens=256)


def _greedy(engine, prompts, n=8):
    """Greedy tokens and the top-5 logprobs of every step, for each prompt."""
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                 logprobs=True, top_logprobs=5))
            for p in prompts]
    while any(not s.finished for s in seqs):
        engine.step()
    return [(list(s.output_ids), s.output_top_logprobs) for s in seqs]


def _assert_same(ours, ref):
    for (ids, tops), (ref_ids, ref_tops) in zip(ours, ref):
        assert ids == ref_ids
        for top, ref_top in zip(tops, ref_tops):
            assert [t for t, _ in top] == [t for t, _ in ref_top]
            np.testing.assert_allclose([v for _, v in top], [v for _, v in ref_top],
                                       atol=LOGPROB_TOL)


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    """(arch, TP at conversion) → converted folder."""
    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for arch in ARCHS:
        for tp in (1, 4):
            folders[(arch, tp)] = root / f"{arch}-tp{tp}"
            convert_model(tiny_models[arch], folders[(arch, tp)], tp_size=tp)
    return folders


@pytest.mark.parametrize("arch", ARCHS)
def test_restored_parameters_equal_loaded_ones(arch, tiny_models, converted):
    """Every parameter, restored at TP=1 or 4 from a conversion at TP=1 or 4, is bit-equal to
    the HF folder's, on the same sharding (KV heads repeated where TP > KV heads)."""
    for serve_tp in (1, 4):
        mesh = make_mesh(serve_tp)
        ref = dict(nnx.to_flat_state(nnx.state(load_model(str(tiny_models[arch]), mesh).model)))
        for convert_tp in (1, 4):
            ours = load_model(str(converted[(arch, convert_tp)]), mesh).model
            flat = dict(nnx.to_flat_state(nnx.state(ours)))
            assert flat.keys() == ref.keys()
            for key, var in flat.items():
                a, b = var.get_value(), ref[key].get_value()
                assert a.sharding.is_equivalent_to(b.sharding, a.ndim), key
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_serves_same_tokens_at_any_tp(arch, tiny_models, converted):
    prompts = [[11, 22, 33, 44, 55, 66, 77], list(range(1000, 1023))]
    refs = {tp: _greedy(_engine(tiny_models[arch], tp), prompts) for tp in (1, 4)}
    for serve_tp, convert_tp in ((1, 1), (4, 1), (1, 4)):
        ours = _greedy(_engine(converted[(arch, convert_tp)], serve_tp), prompts)
        _assert_same(ours, refs[serve_tp])


def test_manifest_describes_the_conversion(tiny_models, converted):
    out = converted[("qwen3", 4)]
    m = json.loads((out / checkpoint.MANIFEST_FILE).read_text())
    assert m["source"]["kind"] == "hf" and m["tp_size"] == 4 and m["dtype"] == "float32"
    assert m["kv_heads"] == 2  # the model's own heads, whatever the TP
    names = {r["name"]: r for r in m["source_files"]}
    assert names["model.safetensors"]["size"] == (tiny_models["qwen3"] / "model.safetensors"
                                                  ).stat().st_size
    assert len(names["config.json"]["sha256"]) == 64
    assert m["param_count"] == sum(int(np.prod(t["shape"])) for t in m["tensors"].values())
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file()


def test_bfloat16_conversion_equals_bfloat16_load(tiny_models, tmp_path):
    out = tmp_path / "bf16"
    convert_model(tiny_models["llama"], out, dtype="bfloat16")
    # Restored at the engine's dtype: bf16 weights read as float32 are the bf16 values.
    mesh = make_mesh(1)
    ref = load_model(str(tiny_models["llama"]), mesh, "bfloat16").model.layers.q_proj[...]
    ours = load_model(str(out), mesh, "float32").model.layers.q_proj[...]
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref.astype(np.float32)))
    prompts = [[5, 6, 7, 8, 9]]
    ref = _greedy(_engine(tiny_models["llama"], dtype="bfloat16"), prompts, n=4)
    ours = _greedy(_engine(out, dtype="bfloat16"), prompts, n=4)
    assert [r[0] for r in ours] == [r[0] for r in ref]


# -- SmolLM2: GGUF → Orbax → served -------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_gguf_converted_serves_same_tokens(tmp_path):
    gguf = default_gguf()
    out = tmp_path / "smollm2"
    result = CliRunner().invoke(app, ["convert", "default", str(out)])
    assert result.exit_code == 0, result.output
    kw = dict(context_length=256, max_running_requests=2, chunked_prefill_size=64,
              max_total_tokens=1024)
    direct = Engine(model_path=str(gguf), **kw)
    served = Engine(model_path=str(out), **kw)
    ids = direct.tokenizer.apply_chat_template(QUESTION)
    assert served.tokenizer.apply_chat_template(QUESTION) == ids
    params = SamplingParams(max_tokens=10, temperature=0)
    assert (served.generate([ids], params)[0]["token_ids"]
            == direct.generate([ids], params)[0]["token_ids"])


def test_default_model_is_cached_as_converted_checkpoint():
    path = resolve_model_path(None)
    assert checkpoint.is_converted(path)
    manifest = checkpoint.require_converted(path)
    assert manifest["source"]["path"] == str(default_gguf().resolve())
    assert resolve_model_path("default") == path  # found again, not converted again


# -- streaming and atomicity on a ~1 GB model -------------------------------------------------

# The child reads its peak from VmHWM: ru_maxrss (RUSAGE_SELF or the parent's RUSAGE_CHILDREN)
# survives exec, so it would report the forked pytest process's size instead.
CHILD = textwrap.dedent("""
    import json, sys, psutil
    from sgljax.engine.convert import convert_model
    import orbax.checkpoint.experimental.v1  # imported before the baseline is taken
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = psutil.Process().memory_info().rss
    m = convert_model(sys.argv[1], sys.argv[2], force=True)
    print(json.dumps({"base": base, "peak": hwm(), "bytes": m["bytes"]}))
""")


def _convert_in_child(src, out) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # finds sgljax as this process did
    env.pop("XLA_FLAGS", None)  # one device, as `sgljax convert` runs by default
    return subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    yield build_big_model(root / "src")
    shutil.rmtree(root, ignore_errors=True)  # 2+ GB: not left for pytest's retention


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM (Linux)")
def test_peak_memory_stays_near_largest_tensor(big_model, tmp_path):
    """Peak RSS ≤ RSS after imports + 3 × largest stacked tensor + 256 MB (fixed slack).

    Holding the whole model (1.1 GB in float32) would exceed that by ~250 MB.
    """
    proc = _convert_in_child(big_model.path, tmp_path / "out")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    m = json.loads(stdout.strip().splitlines()[-1])
    bound = m["base"] + 3 * big_model.largest_bytes + (256 << 20)
    print(f"\nconvert peak RSS {m['peak'] / 2**20:.0f} MiB (base {m['base'] / 2**20:.0f} MiB, "
          f"largest tensor {big_model.largest_bytes / 2**20:.0f} MiB, model "
          f"{m['bytes'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB)")
    assert m["bytes"] > 1e9
    assert m["base"] + m["bytes"] > bound  # the bound would catch a whole-model conversion
    assert m["peak"] <= bound
    assert checkpoint.is_converted(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")


def test_killed_conversion_is_never_loaded(big_model, tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    proc = _convert_in_child(big_model.path, out)
    deadline = time.monotonic() + 120
    # Kill once the checkpoint has started to receive parameters.
    while not any(partial.glob("checkpoint*/*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists() and partial.exists()
    mesh = make_mesh(1)
    for path in (out, partial):
        with pytest.raises((FileNotFoundError, ValueError)):
            load_model(str(path), mesh)
    assert not checkpoint.is_converted(partial)
    with pytest.raises(ValueError, match="incomplete sgljax conversion"):
        resolve_model_path(str(partial))
    # The next run starts over and succeeds.
    convert_model(big_model.path, out)
    assert checkpoint.is_converted(out) and not partial.exists()
    assert resolve_model_path(str(out)) == out
    shutil.rmtree(out)


# -- errors: one line, exit 1 -------------------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def _copy_model(src: Path, dst: Path, config_edit=None, drop=None) -> Path:
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    if drop:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    save_file(tensors, str(dst / "model.safetensors"))
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_edit)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0]


def test_errors_are_one_line(tiny_models, tmp_path):
    src = tiny_models["llama"]
    _one_error_line(_cli(tmp_path / "nothing", tmp_path / "o"), "does not exist")
    _one_error_line(_cli(src, tmp_path / "o", "--dtype", "float16"), "--dtype")
    _one_error_line(_cli(src, tmp_path / "o", "--tp-size", "3"), "tp=3")
    _one_error_line(_cli(src, tmp_path / "o", "--tp-size", "0"), "--tp-size")
    bad = _copy_model(src, tmp_path / "arch", config_edit={"architectures": ["GPT2LMHeadModel"]})
    _one_error_line(_cli(bad, tmp_path / "o"), "unsupported architecture")
    bad = _copy_model(src, tmp_path / "missing", drop="mlp.up_proj")
    _one_error_line(_cli(bad, tmp_path / "o"), "3 tensor(s) missing",
                    "model.layers.0.mlp.up_proj.weight")
    bad = _copy_model(src, tmp_path / "shape", config_edit={"intermediate_size": 96})
    _one_error_line(_cli(bad, tmp_path / "o"), "mlp.gate_proj.weight", "(128, 64)", "(96, 64)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_output_is_not_overwritten_without_force(tiny_models, tmp_path):
    out = tmp_path / "o"
    assert _cli(tiny_models["llama"], out).exit_code == 0
    (out / "from-the-first-run").touch()
    _one_error_line(_cli(tiny_models["llama"], out), "already exists", "--force")
    assert (out / "from-the-first-run").exists()
    assert _cli(tiny_models["llama"], out, "--force").exit_code == 0
    assert not (out / "from-the-first-run").exists()  # replaced by a new conversion
    assert checkpoint.is_converted(out)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    _one_error_line(_cli(tiny_models["llama"], precious, "--force"), "not a converted")
    assert (precious / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(tiny_models["llama"], empty).exit_code == 0  # an empty folder is no conversion
    assert checkpoint.is_converted(empty)


def test_disk_full_removes_partial_output(tiny_models, tmp_path, monkeypatch):
    added = []

    def add_then_fill_disk(self, name, array):
        if added:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        added.append(name)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "add", add_then_fill_disk)
    out = tmp_path / "o"
    _one_error_line(_cli(tiny_models["llama"], out), "disk filled up")
    assert not out.exists() and not (tmp_path / "o.partial").exists()
