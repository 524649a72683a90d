"""The model's own sampling defaults, for requests that leave those fields out.

As vLLM and SGLang do: ``generation_config.json`` (written by the model's authors, or
by ``sgljax convert`` for a GGUF) may set temperature, top-p, top-k, min-p and the
repetition penalty; a request that sets a field itself always wins.
"""

from __future__ import annotations

import json
from pathlib import Path

# generation_config.json key → SamplingParams field
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "min_p": "min_p", "repetition_penalty": "repetition_penalty"}


def read_generation_defaults(model_dir: str | Path) -> dict[str, float]:
    """The sampling defaults a model folder's generation_config.json sets (maybe none)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key, name in SAMPLING_KEYS.items():
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = int(value) if name == "top_k" else float(value)
    return out
