"""A per-rank on-disk cache of compiled step executables.

JAX's persistent compilation cache is written only by process 0, so on a
multi-host restart every other host compiles every bucket again. This cache
keeps each rank's own serialized executables under
``<cache dir>/sgljax-executables/rank<R>/<key>.bin`` and loads them back with
``jax.experimental.serialize_executable``. The key covers everything that makes
an executable valid for this process: the lowered program, the JAX and XLA
versions, the platform and device kinds, the rank and the exact devices of the
mesh. A file that cannot be loaded is deleted and the bucket compiled: a
broken cache costs time, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import zlib
from pathlib import Path

import jax
import jaxlib
from jax import monitoring
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

_MAGIC = b"SGLJAX-EXE-2\n"  # then the digest, then the zlib-compressed payload
_DIGEST = 32  # sha256 of the payload, checked before the bytes reach XLA
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_jax_hits = threading.local()  # per thread: JAX persistent-cache hits seen so far
_listening = False


class ExecutableCache:
    def __init__(self, cache_dir: str | Path, mesh):
        _listen_for_jax_cache_hits()
        self.rank = jax.process_index()
        self.dir = Path(cache_dir) / "sgljax-executables" / f"rank{self.rank}"
        self._context = _context(mesh)
        # The executable runs on exactly the mesh's devices, in the mesh's order (as JAX's
        # device assignment has them); the default, every device of the backend, fails to
        # run a program compiled for fewer.
        self._devices = list(mesh.devices.flat)
        self.hits = 0  # loaded from this rank's files
        self.jax_hits = 0  # not in our files, but JAX's persistent cache had it (rank 0 only)
        self.compiled = 0  # really compiled by XLA here (and then stored)
        self.files: set[Path] = set()  # this rank's files that served a bucket (loaded or stored)
        self._lock = threading.Lock()  # counters only: a bucket is built by one thread
        self._store_failed = False

    @property
    def misses(self) -> int:
        return self.jax_hits + self.compiled

    def key(self, lowered: jax.stages.Lowered) -> str:
        h = hashlib.sha256(self._context.encode())
        h.update(lowered.as_text().encode())
        return h.hexdigest()

    def load_or_compile(self, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        path = self.dir / f"{self.key(lowered)}.bin"
        exe = self._load(path, lowered)
        if exe is not None:
            with self._lock:
                self.hits += 1
                self.files.add(path)
            return exe
        before = _jax_hit_count()
        exe = lowered.compile()
        if _jax_hit_count() > before:
            # On CPU, serializing an executable that was itself deserialized writes a file
            # that loads but fails at run time ("Function ... not found"): store only what
            # XLA really compiled here. JAX's cache keeps serving this one on rank 0.
            with self._lock:
                self.jax_hits += 1
            return exe
        with self._lock:
            self.compiled += 1
        self._store(path, exe)
        return exe

    def _load(self, path: Path, lowered: jax.stages.Lowered):
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read cached executable %s (%s): compiling", path, e)
            return None
        try:
            if not blob.startswith(_MAGIC):
                raise ValueError("not an sgljax executable file")
            digest, payload = blob[len(_MAGIC):len(_MAGIC) + _DIGEST], blob[len(_MAGIC) + _DIGEST:]
            if hashlib.sha256(payload).digest() != digest:
                raise ValueError("checksum mismatch (truncated or corrupt)")
            # The pytree structures are not stored: this process's lowering has them.
            in_tree = jax.tree_util.tree_flatten(lowered.args_info)[1]
            return serialize_executable.deserialize_and_load(
                zlib.decompress(payload), in_tree, lowered.out_tree,
                execution_devices=self._devices)
        except Exception as e:  # noqa: BLE001 - any bad entry means: drop it and compile
            log.warning("dropping unusable cached executable %s (%s: %s): compiling", path,
                        type(e).__name__, e)
            path.unlink(missing_ok=True)
            return None

    def _store(self, path: Path, exe: jax.stages.Compiled) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            payload = zlib.compress(serialize_executable.serialize(exe)[0], 1)  # ~4x smaller
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(_MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)  # readers see the whole file or none
            with self._lock:
                self.files.add(path)
        except Exception as e:  # noqa: BLE001 - a cache that cannot write only costs time
            (log.debug if self._store_failed else log.warning)(
                "cannot store executable %s (%s: %s)", path, type(e).__name__, e)
            self._store_failed = True  # one warning, not one per bucket
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _on_jax_event(name: str, **_) -> None:
    if name == _JAX_CACHE_HIT:
        _jax_hits.count = _jax_hit_count() + 1


def _jax_hit_count() -> int:
    return getattr(_jax_hits, "count", 0)


def _listen_for_jax_cache_hits() -> None:
    global _listening
    if not _listening:
        monitoring.register_event_listener(_on_jax_event)
        _listening = True


def _context(mesh) -> str:
    """Everything besides the program that must match for an executable to be reusable."""
    devices = mesh.devices.flat
    backend = jax.devices()[0].client
    parts = [
        f"jax={jax.__version__}", f"jaxlib={jaxlib.__version__}",
        f"platform={backend.platform}", f"platform_version={backend.platform_version}",
        f"kinds={sorted({d.device_kind for d in jax.devices()})}",
        f"process={jax.process_index()}/{jax.process_count()}",
        f"mesh={dict(mesh.shape)}", f"devices={[d.id for d in devices]}",
        f"xla_flags={os.environ.get('XLA_FLAGS', '')}",
        f"libtpu_args={os.environ.get('LIBTPU_INIT_ARGS', '')}",
    ]
    return "\n".join(parts) + "\n"
