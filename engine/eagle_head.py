"""EAGLE and EAGLE3 draft heads: what their HF checkpoints hold, and loading one.

A draft head is a small Llama decoder that reads the target model's features and
guesses the next tokens (engine/eagle_draft.py runs it):

- EAGLE (Li et al. 2024): ``fc`` maps [embedding of the next token, the target's
  final hidden state] (2 x hidden) to hidden; then its decoder layers (``layers.N``;
  the first one without an input norm); logits from the target's LM head, without
  a final norm. Its output hidden state feeds its next step in place of the target's.
- EAGLE3 (Li et al. 2025): ``fc`` maps the target's low, middle and high features
  (the inputs of three layers side by side, 3 x the target's hidden) to the head's
  hidden; its one layer (``midlayer``) attends over [input_layernorm(embedding),
  hidden_norm(hidden)] (2 x hidden in) with the hidden state as its residual; a final
  ``norm`` and an LM head of its own over a smaller draft vocabulary, mapped to the
  target's by ``d2t`` (target id = draft id + d2t[draft id]). Its output before the
  norm feeds its next step.

Checkpoints: a folder with config.json (a Llama config; EAGLE3 adds
``draft_vocab_size`` and, optionally, ``eagle_config.eagle_aux_hidden_state_layer_ids``)
and safetensors (a pytorch_model.bin is refused with the line that converts it). A head
without ``embed_tokens`` shares the target's embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sgljax.engine.config import ModelConfig, ModelConfigError
from sgljax.engine.weights import LAYER_TENSORS, safetensors_getter

# The decoder's per-layer names → HF's (engine/weights.py), and EAGLE3's second input norm.
_LAYER_TENSORS = {**{ours: hf for ours, hf in LAYER_TENSORS.items() if "{e}" not in hf},
                  "hidden_norm": "hidden_norm.weight"}


@dataclass(frozen=True)
class EagleHeadConfig:
    kind: str  # EAGLE | EAGLE3
    layer: ModelConfig  # the head's decoder sizes, as a Llama config
    # The target features it reads (model.forward's ``capture``): () the final hidden
    # state (EAGLE); EAGLE3: the layers whose inputs it reads, low to high.
    capture: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return self.layer.num_layers


@dataclass
class EagleHead:
    cfg: EagleHeadConfig
    # numpy arrays: fc (D, F) [, fc_bias (D,)] [, embed (V, D)]; EAGLE3: norm, lm_head, hot
    top: dict
    layers: list[dict]  # per draft layer, the decoder's names (engine/model.py)


def read_head_config(path: Path, kind: str, target: ModelConfig) -> EagleHeadConfig:
    raw = json.loads((path / "config.json").read_text())
    layer = ModelConfig.from_hf_dict({**raw, "architectures": ["LlamaForCausalLM"]})
    if kind == "EAGLE3":
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        L = target.num_layers
        # The inputs of layers 2, L/2 and L - 3 unless the head says which outputs it took.
        capture = tuple(i + 1 for i in ids) if ids else (2, L // 2, L - 3)
        if len(capture) != 3 or not all(0 <= i <= L for i in capture):
            raise ModelConfigError(f"{path}: EAGLE3 reads three of the target's {L} layers, "
                                   f"not {capture}")
        return EagleHeadConfig(kind, layer, capture)
    if layer.hidden_size != target.hidden_size:
        raise ModelConfigError(f"{path}: an EAGLE head's hidden size ({layer.hidden_size}) "
                               f"must be the target's ({target.hidden_size})")
    return EagleHeadConfig(kind, layer, ())


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    if not any(path.glob("*.safetensors")) and (path / "pytorch_model.bin").is_file():
        raise ModelConfigError(  # a pickle: torch's to read, not ours
            f"{path}: the head is a pytorch_model.bin; save it as safetensors once (with "
            "torch: safetensors.torch.save_file(torch.load('pytorch_model.bin'), "
            "'model.safetensors'))")
    get = safetensors_getter(path)
    return {name.removeprefix("model."): get(name) for name in sorted(get.names)}


def load_head(path: str | Path, kind: str, target: ModelConfig, dtype) -> EagleHead:
    """The head at ``path`` (a folder) for ``target``, its weights in ``dtype``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelConfigError(f"--speculative-draft-model-path {path}: no config.json")
    cfg = read_head_config(path, kind, target)
    tensors = _read_tensors(path)
    prefixes = ["midlayer."] if kind == "EAGLE3" else [
        f"layers.{i}." for i in range(cfg.num_layers)]
    missing = [p for p in prefixes if not any(k.startswith(p) for k in tensors)]
    if missing or "fc.weight" not in tensors:
        raise ModelConfigError(f"{path}: not an {kind} head (no {(missing or ['fc.weight'])[0]}"
                               f"* tensors); EAGLE heads have layers.N, EAGLE3 heads a midlayer")
    cast = lambda a: np.asarray(a).astype(dtype)  # noqa: E731  (placed on the mesh once, later)
    layers = [{ours: cast(tensors[p + hf]) for ours, hf in _LAYER_TENSORS.items()
               if p + hf in tensors} for p in prefixes]
    top = {"fc": cast(tensors["fc.weight"])}
    if "fc.bias" in tensors:
        top["fc_bias"] = cast(tensors["fc.bias"])
    if "embed_tokens.weight" in tensors:
        top["embed"] = cast(tensors["embed_tokens.weight"])
    D = cfg.layer.hidden_size
    want_in = 3 * target.hidden_size if kind == "EAGLE3" else 2 * D
    if top["fc"].shape != (D, want_in):
        raise ModelConfigError(f"{path}: fc is {tuple(top['fc'].shape)}, expected {(D, want_in)}")
    if "embed" not in top and D != target.hidden_size:
        raise ModelConfigError(f"{path}: a head without embed_tokens shares the target's "
                               "embedding, so its hidden size must be the target's")
    if kind == "EAGLE3":
        for name in ("norm.weight", "lm_head.weight"):
            if name not in tensors:
                raise ModelConfigError(f"{path}: an EAGLE3 head needs {name}")
        top["norm"] = cast(tensors["norm.weight"])
        top["lm_head"] = cast(tensors["lm_head.weight"])
        Vd = top["lm_head"].shape[0]
        d2t = tensors.get("d2t", np.zeros(Vd, np.int64)).astype(np.int64)
        hot = np.arange(Vd) + d2t
        if d2t.shape != (Vd,) or hot.min() < 0 or hot.max() >= target.vocab_size:
            raise ModelConfigError(f"{path}: d2t does not map the {Vd} draft tokens into the "
                                   f"target's vocabulary of {target.vocab_size}")
        top["hot"] = hot.astype(np.int32)
    return EagleHead(cfg, top, layers)
