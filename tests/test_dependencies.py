"""What the code imports is what the package declares, and the serving path needs no torch."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("engine", "cli", "kernels")
# Imported only by code that runs in another interpreter: cli/sky_bridge.py is executed by
# SkyPilot's own venv (scripts/setup-sky.sh), never imported in ours.
OTHER_VENVS = {"sky"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))


def _imported_modules() -> dict[str, set[str]]:
    """Top-level third-party modules the package imports (anywhere in a file) → files."""
    found: dict[str, set[str]] = {}
    for d in PACKAGE_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "sgljax":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for r in project["optional-dependencies"]["bench"]}
    dists = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in _imported_modules().items():
        if module in OTHER_VENVS:
            continue
        names = {_canonical(d) for d in dists.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_dependency_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing = []
    for req in project["dependencies"]:
        try:
            importlib.metadata.version(_requirement_name(req))
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    assert not missing, f"declared but not installed: {missing}"


def test_every_pin_covers_what_is_installed():
    """constraints.txt pins every installed distribution at the installed version."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_canonical(name)] = version
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        if name in ("sgljax", "pip", "setuptools", "wheel"):
            continue
        assert name in pins, f"{name} is installed but not pinned in constraints.txt"
        assert dist.version.split("+")[0] == pins[name], (
            f"{name} {dist.version} is installed but constraints.txt pins {pins[name]}")


# None in sys.modules: `import torch` fails and find_spec says it is absent, as in a venv
# without it (transformers probes with find_spec).
BLOCK_TORCH = '''
import sys
for name in ("torch", "torchvision", "torchaudio"):
    sys.modules[name] = None
'''


def test_serving_path_imports_without_torch(tmp_path):
    """The CLI, the server, the engine and the tokenizer load with torch blocked."""
    code = BLOCK_TORCH + '''
import sgljax.cli.main, sgljax.server.app, sgljax.engine.engine
from sgljax.engine.tokenizer import Tokenizer
from sgljax.server.openai_adapters import prepare_chat
assert sys.modules["torch"] is None
print("ok")
'''
    env = dict(os.environ, TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
