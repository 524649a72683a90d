"""Decode attention over pages on XLA CPU: a C++ kernel called through the XLA FFI.

The pure-JAX ``paged_attention`` gathers each block of pages into a temporary
before the dots read it; on CPU a decode step is bound by memory traffic, and
that costs about three passes over the KV bytes. ``cpu_decode_attention.cc``
reads every key and value row once, from the pool itself.

The source is compiled on first use with the system C++ compiler (``-O3
-march=native``: the machine that runs it builds it) into the sgljax cache,
keyed by the source, the flags, the jaxlib version and the CPU, and registered
as an FFI target. ``available()`` says whether that worked; callers fall back
to ``paged_attention`` when it did not (no compiler, another platform).
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
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

TARGET = "sgljax_cpu_decode_attention"
SOURCE = Path(__file__).with_name("cpu_decode_attention.cc")
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


def _build() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_signature().encode()):
        key.update(part)
    out = _cache_dir() / f"cpu_decode_attention-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(built, out)  # atomic: concurrent builders never load a half-written file
    return out


@functools.cache
def available() -> bool:
    """Build (or find) and register the kernel once per process; False if that fails."""
    if os.environ.get("SGLJAX_DISABLE_CPU_KERNELS"):
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SgljaxDecodeAttention),
                                    platform="cpu")
        return True
    except Exception as e:  # noqa: BLE001 — any failure means: use the pure-JAX path
        log.warning("CPU decode-attention kernel unavailable, using pure JAX: %s", e)
        return False


def cpu_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         layer: jax.Array, page_table: jax.Array, positions: jax.Array,
                         kv_lens: jax.Array) -> jax.Array:
    """Same contract as ``paged_attention`` for one query token per sequence (Q = 1).

    q (S, 1, H, D) float32; caches (L, num_pages, KV, page_size, D) float32."""
    s, qn, h, d = q.shape
    if qn != 1:
        raise ValueError(f"cpu_decode_attention takes one query token per sequence, not {qn}")
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((s, h, d), jnp.float32))(
        q.reshape(s, h, d).astype(jnp.float32), k_cache, v_cache,
        jnp.asarray(layer, jnp.int32).reshape(1), page_table.astype(jnp.int32),
        positions[:, 0].astype(jnp.int32), kv_lens.astype(jnp.int32))
    return out.reshape(s, 1, h, d).astype(q.dtype)
