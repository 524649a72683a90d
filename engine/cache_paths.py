"""Where sgljax keeps what it makes once and reuses: converted models, compiled steps.

JAX-free, so the CLI can find these folders without starting JAX.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SGLJAX_CACHE_DIR, else $XDG_CACHE_HOME/sgljax, else ~/.cache/sgljax."""
    base = os.environ.get("SGLJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sgljax")
    return Path(base)


def compilation_cache_dir(configured: str | Path | None = None) -> Path:
    """The persistent compilation cache: the flag, else $JAX_COMPILATION_CACHE_DIR, else
    under cache_root()."""
    return Path(configured or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                or cache_root() / "jax-cache")
