"""The CLI answers bad input with one plain line and a non-zero exit."""

import subprocess
import sys

import pytest


def _sgljax(*args):
    return subprocess.run([sys.executable, "-m", "sgljax.cli.main", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model-path", "/no/such/model", "hi"], "does not exist"),
    (["generate", "--model-path", "/tmp", "hi"], "no config.json"),
    (["generate", "--tp-size", "64", "hi"], "--tp-size 64 needs 64 devices"),
])
def test_bad_input_one_line(args, message):
    out = _sgljax(*args)
    assert out.returncode == 1
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr


def test_prompt_longer_than_context(tiny_models):
    out = _sgljax("generate", "--model-path", str(tiny_models["qwen3"]), "--raw",
                  "--context-length", "8", "one two three four five six seven eight nine ten")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: This model's maximum context length is 8 tokens; the prompt has")


def test_folder_without_weights(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text((tiny_models["qwen3"] / "config.json").read_text())
    out = _sgljax("generate", "--model-path", str(tmp_path), "hi")
    assert out.returncode == 1 and "no *.safetensors weights" in out.stderr


def test_a_missing_dependency_is_one_line_naming_it(tmp_path):
    """convert with the gguf package absent: one `error:` line naming it and the fix."""
    code = ("import sys; sys.modules['gguf'] = None\n"
            "from sgljax.cli.main import app\n"
            f"app(['convert', 'default', {str(tmp_path / 'out')!r}])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Python package 'gguf' is missing")
    assert "scripts/setup.sh" in last
    assert not (tmp_path / "out").exists()
