"""Weights in, engine layout out: HF safetensors folders and GGUF files.

The engine layout stacks each per-layer weight on a leading layer axis and
keeps linear weights as HF stores them, (out, in): the forward pass runs on
feature-major activations, ``w @ x``, which XLA's CPU matmuls run faster for
decode-sized batches (engine/model.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sgljax.engine.asr_config import text_tensor_name
from sgljax.engine.config import ModelConfig

# engine name → HF per-layer name
LAYER_TENSORS = {
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
KV_HEAD_TENSORS = {"k_proj", "v_proj", "k_bias", "v_bias"}
DENSE_MLP_TENSORS = ("gate_proj", "up_proj", "down_proj")  # stacked over the dense layers only
# Sparse layers' tensors, stacked over the sparse layers only. Expert ones ("{e}") gain an
# expert axis after the layer axis: (L_moe, E, out, in).
MOE_TENSORS = {
    "router": "mlp.gate.weight",
    "expert_gate_proj": "mlp.experts.{e}.gate_proj.weight",
    "expert_up_proj": "mlp.experts.{e}.up_proj.weight",
    "expert_down_proj": "mlp.experts.{e}.down_proj.weight",
}
SHARED_EXPERT_TENSORS = {  # Qwen2-MoE
    "shared_gate_proj": "mlp.shared_expert.gate_proj.weight",
    "shared_up_proj": "mlp.shared_expert.up_proj.weight",
    "shared_down_proj": "mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "mlp.shared_expert_gate.weight",
}
LAYER_TENSORS.update(MOE_TENSORS)
LAYER_TENSORS.update(SHARED_EXPERT_TENSORS)


class WeightsError(ValueError):
    """The weights are missing, incomplete or do not fit the config."""


def layer_tensor_names(cfg: ModelConfig) -> list[str]:
    names = ["input_norm", "post_attn_norm", "q_proj", "k_proj", "v_proj", "o_proj"]
    if cfg.num_dense_layers:
        names += list(DENSE_MLP_TENSORS)
    if cfg.qkv_bias:
        names += ["q_bias", "k_bias", "v_bias"]
    if cfg.qk_norm:
        names += ["q_norm", "k_norm"]
    if cfg.is_moe:
        names += list(MOE_TENSORS)
        if cfg.shared_expert_intermediate_size:
            names += list(SHARED_EXPERT_TENSORS)
    return names


def stacked_layers(cfg: ModelConfig, name: str) -> list[int]:
    """The model layers whose tensors engine parameter ``name`` stacks, in order."""
    if name in DENSE_MLP_TENSORS and cfg.is_moe:
        return [i for i, sparse in enumerate(cfg.moe_layers) if not sparse]
    if name in MOE_TENSORS or name in SHARED_EXPERT_TENSORS:
        return [i for i, sparse in enumerate(cfg.moe_layers) if sparse]
    return list(range(cfg.num_layers))


def per_expert(name: str) -> bool:
    return "{e}" in LAYER_TENSORS[name]


def hf_layer_names(cfg: ModelConfig, name: str, layer: int) -> list[str]:
    """HF names of one layer's part of engine parameter ``name``: one per expert for
    expert tensors (hub checkpoints and save_pretrained store them per expert)."""
    suffix = LAYER_TENSORS[name]
    if per_expert(name):
        return [f"model.layers.{layer}.{suffix.format(e=e)}" for e in range(cfg.num_experts)]
    return [f"model.layers.{layer}.{suffix}"]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name → shape, for every tensor the engine reads."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    per_layer = {
        "input_norm": (d,), "post_attn_norm": (d,), "q_proj": (qd, d), "k_proj": (kvd, d),
        "v_proj": (kvd, d), "o_proj": (d, qd), "q_bias": (qd,), "k_bias": (kvd,),
        "v_bias": (kvd,), "q_norm": (hd,), "k_norm": (hd,), "gate_proj": (f, d),
        "up_proj": (f, d), "down_proj": (d, f),
    }
    fm, fs = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    per_layer.update({
        "router": (cfg.num_experts, d), "expert_gate_proj": (fm, d), "expert_up_proj": (fm, d),
        "expert_down_proj": (d, fm), "shared_gate_proj": (fs, d), "shared_up_proj": (fs, d),
        "shared_down_proj": (d, fs), "shared_expert_gate": (1, d),
    })
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for name in layer_tensor_names(cfg):
        for i in stacked_layers(cfg, name):
            for hf in hf_layer_names(cfg, name, i):
                shapes[hf] = per_layer[name]
    return shapes


def replicate_kv_heads(w, kv_heads: int, target: int, head_dim: int, axis: int = 0, xp=np):
    """Repeat each KV head so ``target`` heads exist (TP wider than the KV heads).

    ``w``'s dimension ``axis`` holds the heads (heads * head_dim rows): axis 0 of one
    layer's k/v weight or bias, axis 1 of a stacked (L, ...) one. ``xp`` is numpy, or
    jax.numpy inside a jitted restore (engine/checkpoint.py)."""
    if target == kv_heads:
        return w
    reps = target // kv_heads
    lead, rest = w.shape[:axis], w.shape[axis + 1:]
    w = w.reshape(*lead, kv_heads, 1, head_dim, *rest)
    return xp.broadcast_to(w, (*lead, kv_heads, reps, head_dim, *rest)).reshape(
        *lead, target * head_dim, *rest)


def engine_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], kv_heads: int,
                   dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (engine path, array) one parameter at a time, from HF-named tensors."""
    shapes = expected_shapes(cfg)

    def fetch(name: str) -> np.ndarray:
        arr = get(name)
        if tuple(arr.shape) != shapes[name]:
            raise WeightsError(f"{name}: shape {tuple(arr.shape)}, config expects {shapes[name]}")
        return arr

    # Arrays are yielded straight from expressions, never held in a local, so the
    # generator keeps no reference: the consumer alone decides when one is freed.
    yield "embed", fetch("model.embed_tokens.weight").astype(dtype, copy=False)
    for name in layer_tensor_names(cfg):
        yield f"layers.{name}", _stack_layers(cfg, fetch, name, kv_heads, dtype)
    yield "final_norm", fetch("model.norm.weight").astype(dtype, copy=False)
    if not cfg.tie_word_embeddings:
        yield "lm_head", fetch("lm_head.weight").astype(dtype, copy=False)


def _stack_layers(cfg: ModelConfig, fetch: Callable[[str], np.ndarray], name: str,
                  kv_heads: int, dtype) -> np.ndarray:
    """One engine parameter: every layer's tensor (each expert's, for expert tensors),
    filled into one preallocated array."""
    layers = stacked_layers(cfg, name)
    lead = (len(layers), cfg.num_experts) if per_expert(name) else (len(layers),)
    stacked = None
    for j, layer in enumerate(layers):
        for e, hf_name in enumerate(hf_layer_names(cfg, name, layer)):
            w = fetch(hf_name).astype(dtype, copy=False)
            if name in KV_HEAD_TENSORS:
                w = replicate_kv_heads(w, cfg.num_kv_heads, kv_heads, cfg.head_dim)
            if stacked is None:  # np.stack of a list would hold every layer twice
                stacked = np.empty((*lead, *w.shape), dtype=w.dtype)
            stacked[(j, e) if per_expert(name) else j] = w
    return stacked


# -- safetensors -------------------------------------------------------------

def safe_open(path: Path, framework: str = "numpy"):
    """safetensors' ``safe_open``, a damaged file a WeightsError that names it."""
    import safetensors

    try:
        return safetensors.safe_open(path, framework=framework)
    except safetensors.SafetensorError as e:
        raise WeightsError(f"cannot read the weights in {path} ({e}): the file is half-written "
                           "or corrupt; download or convert it again") from None


def safetensors_getter(folder: Path) -> Callable[[str], np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors weights")
    where: dict[str, Path] = {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        for f in files:
            with safe_open(f, framework="numpy") as h:
                where.update({k: f for k in h.keys()})
    # A Qwen3-ASR folder's decoder tensors, by the plain decoder's names too.
    stored = {alias: k for k in list(where) if (alias := text_tensor_name(k)) is not None}
    where.update({alias: where[k] for alias, k in stored.items()})

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise WeightsError(f"{folder}: tensor {name} is missing")
        key = stored.get(name, name)
        with safe_open(where[name], framework="numpy") as h:
            if h.get_slice(key).get_dtype() != "BF16":
                return h.get_tensor(key)  # one copy; the "flax" path below makes two
        # numpy has no bfloat16 of its own: "flax" reads it (as ml_dtypes.bfloat16).
        with safe_open(where[name], framework="flax") as h:
            return np.asarray(h.get_tensor(key))

    get.names = frozenset(where)  # what the folder holds, to name every missing tensor at once
    return get


# -- GGUF --------------------------------------------------------------------

GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight", "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
}
GGUF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    """An HF-style config.json dict from a GGUF file's metadata."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCH:
        raise WeightsError(f"GGUF architecture {arch!r} is not supported")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    heads = g("attention.head_count")
    hidden = g("embedding_length")
    vocab = g("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
    return {
        "architectures": [GGUF_ARCH[arch]], "model_type": arch, "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": g("attention.key_length", hidden // heads),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaves rotary halves of q/k rows; restore the HF order."""
    d, d_in = w.shape
    return w.reshape(n_head, d // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d, d_in)


def gguf_getter(path: Path) -> tuple[dict, Callable[[str], np.ndarray]]:
    """GGUF tensors, dequantized to float32, each read whole.

    No per-slice reads here: quantized blocks pack many values behind shared scales
    and llama.cpp permutes q/k rows, so a slice is no byte range of the file. The
    loader serves GGUF through the f32 safetensors folder prepared from it once,
    whose tensors it does read by the slice (engine/shard_reads.py).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    config = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(config["num_hidden_layers"]):
        for short, hf in GGUF_LAYER_NAMES.items():
            suffix = "" if short.endswith(".bias") else ".weight"
            hf_to_gguf[f"model.layers.{i}.{hf}"] = f"blk.{i}.{short}{suffix}"
    permute_llama = config["model_type"] == "llama"

    def get(name: str) -> np.ndarray:
        t = tensors.get(hf_to_gguf.get(name, ""))
        if t is None:
            raise WeightsError(f"{path}: tensor {name} is missing")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permute_llama and name.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif permute_llama and name.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        return w

    get.names = frozenset(hf for hf, g in hf_to_gguf.items() if g in tensors)
    return config, get
