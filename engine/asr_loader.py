"""Load a Qwen3-ASR checkpoint folder's audio side: encoder + projector weights.

The text decoder in the same folder is read by the ordinary loader (engine/loader.py),
whose safetensors reader sees its tensors under the names of a plain Qwen3 model
(engine/asr_config.py's ``text_tensor_name``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sgljax.engine import checkpoint
from sgljax.engine.asr_config import AUDIO_PREFIXES, PROJECTOR_PREFIXES, AsrConfig
from sgljax.engine.asr_encoder import params_from_tensors
from sgljax.engine.weights import WeightsError, safetensors_getter


def _prefix(names, candidates, what: str, folder: Path) -> str | None:
    for p in candidates:
        if any(n.startswith(p) for n in names):
            return p
    if what:
        raise WeightsError(f"{folder}: no {what} tensors (looked for {', '.join(candidates)})")
    return None


def load_audio_params(path: str | Path, cfg: AsrConfig, dtype=np.float32) -> dict:
    """The encoder's params pytree (numpy): from the folder's safetensors, or from the
    audio checkpoint of a folder made by ``sgljax convert``."""
    folder = Path(path)
    if checkpoint.is_converted(folder):
        from sgljax.engine.asr_checkpoint import restore_audio_params

        params = restore_audio_params(folder, cfg)
        return {k: (v.astype(dtype) if k != "layers" else
                    {n: a.astype(dtype) for n, a in v.items()}) for k, v in params.items()}
    get = safetensors_getter(folder)
    tower = _prefix(get.names, AUDIO_PREFIXES, "audio encoder", folder)
    projector = _prefix(get.names, PROJECTOR_PREFIXES, "", folder)
    return params_from_tensors(cfg.encoder, get, tower, projector, dtype)
