"""Converted models: the engine's parameters as one Orbax checkpoint, restored onto any mesh.

A converted model folder holds::

    config.json, tokenizer files, generation_config.json   what serving reads
    checkpoint/            one Orbax checkpoint; the parameter tree is in checkpoint/state
    sgljax-manifest.json   source, source hashes, dtype, versions, parameter count
    sgljax-commit          written last: its presence says the folder is complete

Parameters are stored in the engine layout (layers stacked, linear weights as
(in, out), the chosen dtype) with the model's own KV heads, i.e. the TP=1
layout. When TP is wider than the KV heads, restore repeats them on device, so
one checkpoint serves every TP size.

The checkpoint is written one parameter at a time with Orbax's partial save
(each call adds keys to a pending checkpoint; ``finalize`` merges them into a
single ordinary checkpoint), so only one stacked tensor is in memory at once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from sgljax.engine.config import ModelConfig
from sgljax.engine.params import param_name, param_shardings
from sgljax.engine.weights import KV_HEAD_TENSORS, replicate_kv_heads

from sgljax.engine.checkpoint_format import COMMIT_FILE, FORMAT_VERSION, MANIFEST_FILE  # noqa: F401
CHECKPOINT_DIR = "checkpoint"
STATE_DIR = "state"  # where Orbax's v1 layout puts the saved tree
ORBAX_COMMIT_FILE = "commit_success.txt"
PARTIAL_SUFFIX = ".partial"
RESTORE_GROUP_BYTES = 512 << 20


class CheckpointError(ValueError):
    """A converted model folder is incomplete, damaged or does not fit the config."""


# -- what a folder is ----------------------------------------------------------

def is_converted(path: str | Path) -> bool:
    """True for a complete converted folder (manifest, finalized checkpoint, commit marker)."""
    path = Path(path)
    return ((path / COMMIT_FILE).is_file() and (path / MANIFEST_FILE).is_file()
            and (path / CHECKPOINT_DIR / ORBAX_COMMIT_FILE).is_file())


def looks_like_conversion(path: str | Path) -> bool:
    """True when a folder is, or was meant to be, a converted model (complete or not)."""
    path = Path(path)
    return (path.name.endswith(PARTIAL_SUFFIX) or (path / COMMIT_FILE).exists()
            or (path / MANIFEST_FILE).exists())


def require_converted(path: str | Path) -> dict:
    """The manifest of a complete converted folder, or a CheckpointError saying what is wrong."""
    path = Path(path)
    if not is_converted(path):
        raise CheckpointError(f"{path} is an incomplete sgljax conversion (interrupted?); "
                              "run `sgljax convert` again")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}; this "
                              f"sgljax reads format {FORMAT_VERSION} (convert it again)")
    return manifest


def write_commit_marker(folder: Path) -> None:
    """The last file of a conversion; flushed to disk before the folder is renamed."""
    marker = folder / COMMIT_FILE
    with open(marker, "w") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing -------------------------------------------------------------------------

def _nest(flat: dict[str, object]) -> dict:
    """{"layers.q_proj": x} → {"layers": {"q_proj": x}}: the tree Orbax saves."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out.update(_flatten(v, name + ".") if isinstance(v, dict) else {name: v})
    return out


def _saving_context():
    import orbax.checkpoint.experimental.v1 as ocp1

    ctx = ocp1.Context()
    # Uncompressed: float weights shrink little under zstd, and decompressing made
    # restores slower than reading safetensors (SmolLM2 f32 on CPU: 3-4 s against 2-3 s).
    ctx.array.saving.use_compression = False
    return ctx


class CheckpointWriter:
    """Adds engine parameters to one Orbax checkpoint, one call per parameter."""

    def __init__(self, directory: Path):
        from orbax.checkpoint.experimental.v1 import partial

        self._partial = partial
        self.directory = Path(directory)
        self.tensors: dict[str, dict] = {}

    def add(self, name: str, array: jax.Array) -> None:
        with _saving_context():
            self._partial.save(self.directory, _nest({name: array}))
        self.tensors[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}

    def finish(self) -> None:
        self._partial.finalize(self.directory)
        if not (self.directory / ORBAX_COMMIT_FILE).is_file():
            raise CheckpointError(f"{self.directory}: Orbax did not commit the checkpoint")


# -- restoring -------------------------------------------------------------------------

def _is_kv_tensor(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in KV_HEAD_TENSORS


def _repeat_kv_heads(x: jax.Array, stored: int, target: int, head_dim: int,
                     sharding: NamedSharding) -> jax.Array:
    """Repeat each KV head target/stored times along axis 1 (after layers), as the loader does."""
    return jax.jit(lambda w: replicate_kv_heads(w, stored, target, head_dim, axis=1, xp=jnp),
                   out_shardings=sharding)(x)


def restore_into(path: str | Path, cfg: ModelConfig, flat_state: dict, mesh,
                 kv_heads: int) -> dict:
    """Fill an abstract model's flat state (from ``nnx.to_flat_state``) from a converted folder.

    Every parameter is read straight onto its sharding on ``mesh`` and cast to the
    state's dtype. Returns the manifest.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    manifest = require_converted(path)
    stored_kv = int(manifest["kv_heads"])
    shardings = param_shardings(flat_state, mesh)
    keys = {param_name(k): k for k in flat_state if param_name(k) in shardings}
    stored = manifest["tensors"]
    if set(stored) != set(keys):
        missing, extra = sorted(set(keys) - set(stored)), sorted(set(stored) - set(keys))
        raise CheckpointError(f"{path}: the checkpoint's parameters do not fit config.json "
                              f"(missing {missing or 'none'}, unexpected {extra or 'none'})")
    targets, repeat = {}, {}
    for name, key in keys.items():
        want = flat_state[key].get_value()
        shape = tuple(want.shape)
        sharding = shardings[name]
        if _is_kv_tensor(name) and kv_heads != stored_kv:
            # Read the model's own heads replicated (they are small), repeat them on device.
            shape = (shape[0], stored_kv * cfg.head_dim, *shape[2:])  # heads follow layers
            repeat[name], sharding = sharding, NamedSharding(mesh, PartitionSpec())
        if tuple(stored[name]["shape"]) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(stored[name]['shape'])} in "
                                  f"the checkpoint, config.json expects {shape}")
        targets[name] = jax.ShapeDtypeStruct(shape, want.dtype, sharding=sharding)
    state_dir = path / CHECKPOINT_DIR / STATE_DIR
    if not (state_dir / "_METADATA").is_file():  # a copy that stopped part-way
        raise CheckpointError(f"{path}: the Orbax checkpoint has no {state_dir / '_METADATA'}; "
                              "it is damaged or was copied half-way: convert it again with "
                              "`sgljax convert SOURCE OUT`")
    reader = ocp.PyTreeCheckpointer()
    for group in _groups(targets):
        tree = _nest(group)
        args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(
            sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), tree)
        try:
            restored = reader.restore(path / CHECKPOINT_DIR / STATE_DIR,
                                      args=ocp.args.PyTreeRestore(item=tree, restore_args=args,
                                                                  partial_restore=True))
        except Exception as e:  # noqa: BLE001 - TensorStore / Orbax: a damaged folder
            first = (str(e).strip().splitlines() or [""])[0]
            first = first.split(" [tensorstore_spec")[0][:300]
            reader.close()
            raise CheckpointError(f"{path}: the Orbax checkpoint cannot be read "
                                  f"({type(e).__name__}: {first}); it is damaged or was copied "
                                  "half-way: convert it again with `sgljax convert SOURCE OUT`"
                                  ) from None
        for name, array in _flatten(restored).items():
            if name in repeat:
                array = _repeat_kv_heads(array, stored_kv, kv_heads, cfg.head_dim, repeat[name])
            flat_state[keys[name]].set_value(array)
    return manifest


def tensorstore_bytes_read() -> int:
    """Bytes TensorStore has read from storage in this process so far (all kvstore drivers).

    The restore passes each parameter's target sharding, so TensorStore reads only
    the stored chunks that overlap this process's devices; the difference of this
    counter around a restore shows how much that was.
    """
    import tensorstore as ts

    return sum(int(v.get("value", 0))
               for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/")
               if m.get("name", "").endswith("/bytes_read") for v in m.get("values", []))


def _groups(targets: dict[str, jax.ShapeDtypeStruct]) -> list[dict]:
    """Targets in groups of about RESTORE_GROUP_BYTES (a bigger tensor goes alone).

    One restore call for a whole 1.1 GB model peaked ~0.5 GB higher than groups of
    512 MiB, and the reader kept that memory afterwards; groups cost little time.
    """
    groups, current, size = [], {}, 0
    for name, t in targets.items():
        nbytes = math.prod(t.shape) * jnp.dtype(t.dtype).itemsize
        if current and size + nbytes > RESTORE_GROUP_BYTES:
            groups.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return groups + [current] if current else groups


__all__ = ["CheckpointError", "CheckpointWriter", "is_converted", "looks_like_conversion",
           "require_converted", "restore_into", "tensorstore_bytes_read", "write_commit_marker"]
