"""Any model path → a model folder the loader reads.

An HF folder or a finished conversion is used as it is; a GGUF file is dequantized
once into an HF-style folder; nothing (or a default name) is the embedded SmolLM2,
converted once into the cache. Both land under ``cache_root()`` and are reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from sgljax.engine.cache_paths import cache_root
from sgljax.engine.config import ModelConfig
from sgljax.engine.convert import ensure_converted
from sgljax.engine.default_model import (DEFAULT_MODEL, DEFAULT_NAMES, GENERATION_DEFAULTS,
                                         ModelNotFound, default_gguf)
from sgljax.engine.gguf_tokenizer import save_gguf_tokenizer
from sgljax.engine.loader import check_model_folder
from sgljax.engine.weights import expected_shapes, gguf_getter


def resolve_model_path(model_path: str | None) -> Path:
    """A folder with config.json (preparing GGUF files and the default model first)."""
    if model_path is None or model_path in DEFAULT_NAMES:
        # Cached as a converted checkpoint: later starts restore it instead of re-reading weights.
        return ensure_converted(default_gguf(), cache_root() / "models" / f"{DEFAULT_MODEL}-sgljax",
                                label=DEFAULT_MODEL, generation_defaults=GENERATION_DEFAULTS)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model path {model_path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return prepare_gguf_folder(path, cache_root() / "models" / path.stem)
    return check_model_folder(path)


def prepare_gguf_folder(gguf_path: Path, out: Path) -> Path:
    """Turn a GGUF file into an HF-style folder (config, tokenizer, f32 safetensors).

    Dequantizing takes seconds, so it is done once; the folder is written under
    a temporary name and renamed, so an interrupted run leaves nothing half-made.
    """
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.numpy import save_file

    try:
        config, get = gguf_getter(gguf_path)
    except (ValueError, IndexError, KeyError, EOFError) as e:  # gguf's reader on a cut file
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "it may be truncated or half-downloaded: download it again") from None
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = list(expected_shapes(ModelConfig.from_hf_dict(config)))
    save_file({n: np.ascontiguousarray(get(n)) for n in names}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_gguf_tokenizer(gguf_path, tmp)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
