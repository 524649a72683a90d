"""Put a model folder's weights on the mesh: an HF folder (config.json + safetensors,
each process reading only its devices' slices) or a folder made by ``sgljax convert``
(restored straight onto the mesh). Other model paths (a GGUF file, the embedded
default model) become such a folder first: engine/model_files.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sgljax.engine import checkpoint
from sgljax.engine.config import ModelConfig, ModelConfigError, rope_inv_freq
from sgljax.engine.default_model import ModelNotFound
from sgljax.engine.mesh import global_array
from sgljax.engine.model import Decoder
from sgljax.engine.params import (abstract_model, kv_heads_for,  # noqa: F401 (re-exported)
                                  param_shardings)
from sgljax.engine.shard_reads import SafetensorsSlices, ShardReader
from sgljax.engine.weights import WeightsError, expected_shapes

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_model_folder(path: Path) -> Path:
    """``path`` if it is a servable model folder (HF or a finished conversion), else
    ModelNotFound; engine/model_files.py turns other model paths into one."""
    if not path.exists():
        raise ModelNotFound(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelNotFound(f"{path}: expected a model folder or a .gguf file")
    if checkpoint.looks_like_conversion(path):
        checkpoint.require_converted(path)  # an interrupted conversion is never served
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path}: no config.json (not a model folder)")
    return path


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: Decoder
    # Weight bytes this process read (its devices' shards, from safetensors or, for converted
    # folders, as TensorStore counts them) and the size of all the weights.
    bytes_read: int | None = None
    bytes_total: int | None = None


def load_model(model_dir: str | Path, mesh, dtype: str = "float32") -> LoadedModel:
    """Put a model folder's weights on ``mesh`` (``resolve_model_path`` makes one from
    any model path)."""
    path = check_model_folder(Path(model_dir).expanduser())
    cfg = ModelConfig.from_dir(path)
    if dtype not in DTYPES:
        raise ModelConfigError(f"dtype must be one of {', '.join(DTYPES)}")
    jdtype = DTYPES[dtype]
    kv_heads = kv_heads_for(cfg, mesh.shape["tp"])
    graphdef, state = nnx.split(abstract_model(cfg, mesh, jdtype, kv_heads))
    flat = dict(nnx.to_flat_state(state))
    if checkpoint.is_converted(path):  # `sgljax convert` output: read onto this mesh directly
        before = checkpoint.tensorstore_bytes_read()
        manifest = checkpoint.restore_into(path, cfg, flat, mesh, kv_heads)
        bytes_read = checkpoint.tensorstore_bytes_read() - before
        bytes_total = int(manifest["bytes"])
    else:
        bytes_read, bytes_total = _read_shards(path, cfg, flat, mesh, kv_heads, dtype)
    inv = flat[("inv_freq",)]
    inv.set_value(global_array(rope_inv_freq(cfg), NamedSharding(mesh, P())))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return LoadedModel(path, cfg, model, bytes_read, bytes_total)


def _read_shards(path: Path, cfg: ModelConfig, flat: dict, mesh, kv_heads: int,
                 dtype: str) -> tuple[int, int]:
    """Fill every parameter from an HF folder, each process reading only its devices' slices.

    Returns (bytes read, bytes of the source tensors).
    """
    np_dtype = np.float32 if dtype == "float32" else jnp.bfloat16
    with SafetensorsSlices(path) as source:
        source.check(cfg)
        reader = ShardReader(cfg, source, kv_heads, np_dtype)
        for name, sharding in param_shardings(flat, mesh).items():
            var = flat[tuple(name.split("."))]
            shape = tuple(var.get_value().shape)
            var.set_value(jax.make_array_from_callback(
                shape, sharding, reader.callback(name, shape)))
            source.release()
        total = sum(source.nbytes(n) for n in expected_shapes(cfg))
        log.info("read %.1f MiB of %.1f MiB of weights (this process's shards)",
                 source.bytes_read / 2**20, total / 2**20)
        return source.bytes_read, total


__all__ = ["LoadedModel", "ModelNotFound", "WeightsError", "check_model_folder", "load_model"]
