"""A record that a warmup already put every planned step shape in the cache.

``sgljax warmup`` writes one after it has compiled or loaded every bucket; the next
``sgljax warmup`` with the same settings, model and code finds it and returns at once,
without loading the model only to find every shape cached (``sgljax up local`` runs
warmup at every start). The server warms up too, from the same cache, so a stale
record costs compile time, never correctness. JAX-free: it is read before JAX starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from pathlib import Path

from sgljax.engine.cache_paths import compilation_cache_dir

_PACKAGE = Path(__file__).resolve().parents[1]  # sgljax's source tree
# What a step's program is made of (the server and CLI never change what is compiled).
_CODE = {"engine": ("*.py",), "kernels": ("*.py", "*.cc", "*.h")}


def _code_fingerprint() -> list:
    """Size and mtime of every source file: changed code may lower to other programs."""
    return sorted((str(p.relative_to(_PACKAGE)), p.stat().st_size, p.stat().st_mtime_ns)
                  for folder, patterns in _CODE.items() for pattern in patterns
                  for p in (_PACKAGE / folder).glob(pattern))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def record_path(args) -> Path | None:
    """Where the record for these EngineArgs lives; None when no record applies (no
    persistent cache, the default model resolved at load time, or several hosts, whose
    warmups run in lockstep and must all run)."""
    if not args.enable_compilation_cache or args.nnodes > 1 or args.model_path is None:
        return None
    model = Path(args.model_path).expanduser().resolve()
    stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(model.glob("*.json"))] \
        if model.is_dir() else [model.stat().st_mtime_ns] if model.exists() else None
    if stamp is None:
        return None
    key = json.dumps({
        "args": {k: v for k, v in dataclasses.asdict(args).items() if k != "model_path"},
        "model": [str(model), stamp],
        "versions": [_version(d) for d in ("jax", "jaxlib", "sgljax")],
        "code": _code_fingerprint(),
    }, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return compilation_cache_dir(args.compilation_cache_dir) / "sgljax-warm" / f"{digest}.json"


def is_warm(args) -> bool:
    """A record for these settings exists and every executable it lists is still there."""
    path = record_path(args)
    try:
        files = json.loads(path.read_text())["executables"] if path else None
    except (OSError, ValueError, KeyError):
        return False
    return bool(files) and all(Path(f).is_file() for f in files)


def write(args, executables: list[Path]) -> None:
    path = record_path(args)
    if path is None or not executables:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"executables": sorted(map(str, executables))}))
    tmp.replace(path)
