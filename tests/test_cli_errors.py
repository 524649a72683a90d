"""Every command, given what users get wrong (a missing file, a bad model name, a damaged or
half-written checkpoint, an unknown slice, an old SkyPilot), prints one plain ``error:`` line
naming the problem and what to do, and exits non-zero. (tests/test_cli.py, test_up.py and
test_server_ops.py have more.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sgljax.cli import sky_bridge

PY = sys.executable


def _sgljax(*args, env=None, timeout=300):
    return subprocess.run([PY, "-m", "sgljax.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_error_line(out, *needles):
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith("(")]
    last = lines[-1]
    assert last.startswith("error: "), out.stderr
    assert sum(l.startswith("error:") for l in lines) == 1, out.stderr
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def damaged(tiny_models, tmp_path_factory):
    """A checkpoint whose weights file was cut short (a download or copy that died), one
    whose config names no architecture, and a GGUF file of only its magic bytes."""
    root = tmp_path_factory.mktemp("damaged")
    cut = root / "cut"
    shutil.copytree(tiny_models["qwen3"], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    noarch = root / "noarch"
    noarch.mkdir()
    (noarch / "config.json").write_text("{}")
    gguf = root / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    return {"cut": cut, "noarch": noarch, "gguf": gguf}


@pytest.mark.parametrize("command", [
    ["generate", "--model-path", "{cut}", "hi"],
    ["serve", "--model-path", "{cut}", "--skip-server-warmup"],
    ["convert", "{cut}", "{out}"],
])
def test_half_written_safetensors_is_one_line(damaged, tmp_path, command):
    args = [a.format(cut=damaged["cut"], out=tmp_path / "out") for a in command]
    last = _one_error_line(_sgljax(*args), "cannot read the weights in",
                           "model.safetensors", "download or convert it again")
    assert not (tmp_path / "out").exists()
    print(last)


def test_truncated_gguf_is_one_line(damaged):
    _one_error_line(_sgljax("generate", "--model-path", str(damaged["gguf"]), "hi"),
                    "is not a readable GGUF file", "download it again")


def test_config_without_architecture_names_the_supported_ones(damaged):
    _one_error_line(_sgljax("generate", "--model-path", str(damaged["noarch"]), "hi"),
                    "unsupported architecture", "Qwen3ForCausalLM")


@pytest.mark.parametrize("args,needles", [
    (["warmup", "no-such-model"], ["no-such-model does not exist"]),
    (["serve", "--model-path", "no-such-model"], ["does not exist"]),
    (["convert", "no-such-recipe", "/tmp/sgljax-never-written"], ["does not exist"]),
    (["convert", "/no/such/source", "/tmp/sgljax-never-written"], ["does not exist"]),
    (["up", "v9z-8", "qwen3-8b", "--dry-run"], ["unknown TPU generation", "v6e"]),
    (["up", "v6e-7", "qwen3-8b", "--dry-run"], ["v6e slices come in sizes", "not 7"]),
    (["up", "v6e-8", "no-such-model", "--dry-run"], ["no recipe for", "recipes:"]),
    (["up", "local", "no-such-model", "--dry-run"], ["no recipe for", "recipes:"]),
    (["bench", "--base-url", "http://127.0.0.1:1", "--num-prompts", "1"], ["cannot reach"]),
])
def test_bad_names_and_missing_files_are_one_line(args, needles):
    _one_error_line(_sgljax(*args, env={"SGLJAX_SKY_PYTHON": ""}, timeout=180), *needles)


def test_bench_missing_dataset(tmp_path):
    # checked before any request: no server is needed to see the error
    _one_error_line(_sgljax("bench", "--base-url", "http://127.0.0.1:1", "--dataset", "sharegpt",
                            "--num-prompts", "1", "--dataset-path", str(tmp_path / "none.json")),
                    "does not exist")


# -- the SkyPilot release `sgljax up` reaches ---------------------------------------------------
def _fake_sky_python(tmp_path: Path, version: str) -> Path:
    """An interpreter whose `import sky` is a stand-in of the given version, whose Task
    parser fails the way an old SkyPilot's does on sgljax's task."""
    pkg = tmp_path / "fake-site" / "sky"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"""__version__ = {version!r}
class Task:
    @staticmethod
    def from_yaml_config(config):
        raise ValueError("Invalid task YAML: Additional properties are not allowed "
                         "('secrets' was unexpected)")
""")
    fake = tmp_path / "fake-sky-python"
    fake.write_text(f"#!/bin/sh\nPYTHONPATH={pkg.parent} exec {PY} \"$@\"\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("version", ["0.9.3", "0.13.0", "0.15.0", "1.0.0.dev0"])
def test_up_refuses_a_skypilot_outside_the_rendered_range(tmp_path, version):
    fake = _fake_sky_python(tmp_path, version)
    env = {"SGLJAX_SKY_PYTHON": str(fake), "SGLJAX_SKIP_CLOUD_CHECK": "1"}
    last = _one_error_line(_sgljax("up", "v6e-8", "qwen3-8b", env=env, timeout=120),
                           f"error: SkyPilot {version} found; sgljax renders tasks for "
                           "SkyPilot >=0.14,<0.15", "scripts/setup-sky.sh")
    assert "Additional properties" not in last  # not SkyPilot's raw YAML error
    for op in ("down", "status"):
        _one_error_line(_sgljax(op, env=env, timeout=120), f"SkyPilot {version} found")


def test_up_with_a_supported_skypilot_goes_on_to_validate(tmp_path):
    fake = _fake_sky_python(tmp_path, "0.14.1")
    env = {"SGLJAX_SKY_PYTHON": str(fake), "SGLJAX_SKIP_CLOUD_CHECK": "1"}
    # past the version check, the (fake) parser's own complaint comes through, as one line
    _one_error_line(_sgljax("up", "v6e-8", "qwen3-8b", env=env, timeout=120),
                    "SkyPilot rejects the task", "Additional properties")


def test_version_check_bounds():
    for ok in ("0.14.0", "0.14.1", "0.14.9rc1"):
        sky_bridge.check_version(ok)
    for bad in ("0.13.9", "0.15.0", "1.14.0", "", "unknown"):
        with pytest.raises(sky_bridge.SkyVersionError):
            sky_bridge.check_version(bad)


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "ckpt"
    r = _sgljax("convert", str(tiny_models["qwen3"]), str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_interrupted_conversion_is_one_line(converted, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(converted, half)
    (half / "sgljax-commit").unlink()  # what a conversion killed before its last write leaves
    _one_error_line(_sgljax("generate", "--model-path", str(half), "hi"),
                    "incomplete sgljax conversion")


def test_damaged_orbax_checkpoint_is_one_line(converted, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(converted, damaged)
    (damaged / "checkpoint" / "state" / "_METADATA").unlink()
    _one_error_line(_sgljax("generate", "--model-path", str(damaged), "hi"),
                    "the Orbax checkpoint has no", "_METADATA", "convert it again")
