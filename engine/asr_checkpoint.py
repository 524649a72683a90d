"""The audio side of a converted Qwen3-ASR folder: encoder + projector as an Orbax checkpoint.

``sgljax convert`` writes the decoder into ``checkpoint/`` as for any model
(engine/convert.py) and, for an ASR source, the encoder's params pytree (engine
layout: layer tensors stacked) into ``audio_checkpoint/``, listed in the manifest
under ``audio_tensors``. The encoder is small next to the decoder and replicated on
every device, so it is written and restored whole.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from sgljax.engine.asr_config import AsrConfig
from sgljax.engine.asr_encoder import sinusoid_positions
from sgljax.engine.checkpoint import (ORBAX_COMMIT_FILE, STATE_DIR, CheckpointError,
                                      CheckpointWriter, _flatten, _nest, require_converted)

AUDIO_DIR = "audio_checkpoint"
COMPUTED = ("positions",)  # derived from the config, never stored


def write_audio_checkpoint(params: dict, out: Path, np_dtype) -> dict[str, dict]:
    """Save the encoder params into ``out/audio_checkpoint``; returns {name: shape, dtype}."""
    writer = CheckpointWriter(Path(out) / AUDIO_DIR)
    for name, array in _flatten(params).items():
        if name in COMPUTED:
            continue
        writer.add(name, jax.device_put(np.asarray(array).astype(np_dtype, copy=False)))
    writer.finish()
    return writer.tensors


def restore_audio_params(path: str | Path, cfg: AsrConfig) -> dict:
    """The encoder params (numpy, as stored) of a converted folder."""
    import orbax.checkpoint as ocp

    path = Path(path)
    stored = require_converted(path).get("audio_tensors")
    state = path / AUDIO_DIR / STATE_DIR
    if not stored or not (path / AUDIO_DIR / ORBAX_COMMIT_FILE).is_file():
        raise CheckpointError(f"{path}: an ASR model converted without its audio encoder; "
                              "convert it again with `sgljax convert SOURCE OUT`")
    tree = _nest({name: jax.ShapeDtypeStruct(tuple(t["shape"]), np.dtype(t["dtype"]))
                  for name, t in stored.items()})
    args = jax.tree.map(lambda t: ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype), tree)
    reader = ocp.PyTreeCheckpointer()
    try:
        params = reader.restore(state, args=ocp.args.PyTreeRestore(item=tree, restore_args=args))
    except Exception as e:  # noqa: BLE001 - TensorStore / Orbax: a damaged folder
        raise CheckpointError(f"{path}: the audio checkpoint cannot be read "
                              f"({type(e).__name__}); convert it again") from None
    finally:
        reader.close()
    enc = cfg.encoder
    params["positions"] = sinusoid_positions(enc.max_position_embeddings, enc.d_model)
    return params
