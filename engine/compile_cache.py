"""The persistent compilation cache and a counter of every compilation.

Warmup compiles each bucket once and stores it on disk; a restart with the
same settings loads them instead of compiling. After warmup, any compilation
is a bug in the bucket plan: it is counted and logged with what it was for.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import jax
from jax import monitoring

from sgljax.engine.cache_paths import compilation_cache_dir

log = logging.getLogger(__name__)

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_MISS = "/jax/compilation_cache/cache_misses"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def enable_persistent_cache(cache_dir: str | Path | None = None) -> Path:
    """Cache every executable (no size or compile-time threshold) under ``cache_dir``."""
    path = compilation_cache_dir(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@dataclass
class CompileStats:
    compiles: int = 0  # executables built or loaded from the persistent cache
    cache_misses: int = 0  # of those, really compiled by XLA
    cache_hits: int = 0


STATS = CompileStats()
_lock = threading.Lock()
_registered = False


def _on_event(name: str, **_) -> None:
    with _lock:
        if name == _CACHE_MISS:
            STATS.cache_misses += 1
        elif name == _CACHE_HIT:
            STATS.cache_hits += 1


def _on_duration(name: str, secs: float, **_) -> None:
    if name != _BACKEND_COMPILE:
        return
    with _lock:
        STATS.compiles += 1


def watch_compilations() -> CompileStats:
    global _registered
    if not _registered:
        monitoring.register_event_listener(_on_event)
        monitoring.register_event_duration_secs_listener(_on_duration)
        _registered = True
    return STATS
