"""Builds the C++ CPU kernels (XLA FFI handlers) on first use and registers them.

Each ``.cc`` beside this file is compiled with the system C++ compiler (``-O3
-march=native``: the machine that runs a kernel builds it) into the sgljax
cache, keyed by the source and headers, the flags, the jaxlib version and the CPU, and its
handler symbols are registered as FFI targets for the CPU platform. Anything
that fails (no compiler, a CPU without the instructions) leaves the kernel
unavailable, and its callers use their pure-JAX path.
``SGLJAX_DISABLE_CPU_KERNELS=1`` turns them all off (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-fPIC",
         "-shared"]


def _cache_dir() -> Path:
    base = os.environ.get("SGLJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sgljax")
    return Path(base) / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(source: Path) -> Path:
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, " ".join(FLAGS).encode(),
                 jaxlib.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    out = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(built)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(built, out)  # atomic: concurrent builders never load a half-written file
    return out


@functools.cache
def load(source_name: str, targets: tuple[tuple[str, str], ...],
         supported_symbol: str | None = None) -> bool:
    """Build ``source_name`` and register each (FFI target, handler symbol); True if done.

    ``supported_symbol``, when given, names an ``int f(void)`` that says whether the
    build has a real kernel for this CPU (e.g. one that needs AVX-512)."""
    if os.environ.get("SGLJAX_DISABLE_CPU_KERNELS"):
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(Path(__file__).with_name(source_name))))
        if supported_symbol and not getattr(lib, supported_symbol)():
            log.info("%s: not for this CPU, using pure JAX", source_name)
            return False
        for target, symbol in targets:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        return True
    except Exception as e:  # noqa: BLE001 — any failure means: use the pure-JAX path
        log.warning("CPU kernel %s unavailable, using pure JAX: %s", source_name, e)
        return False
