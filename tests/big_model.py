"""A ~1.1 GB random Llama checkpoint (float32, sharded safetensors) for memory tests.

Written with numpy one shard at a time, so building it never holds the whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# 24 layers of hidden 1024 / FFN 2048, 16 heads / 4 KV heads, vocab 32000, untied head:
# 279.5 M parameters = 1.12 GB float32. Largest stacked tensor: a (24, 1024, 2048) MLP
# weight, 201 MB; embedding and head 131 MB each.
BIG_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                  hidden_size=1024, intermediate_size=2048, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)


@dataclass
class BigModel:
    path: Path
    largest_bytes: int  # the largest engine parameter once layers are stacked


def build_big_model(out: Path, cfg: dict = BIG_CONFIG, seed: int = 0) -> BigModel:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    d, f, v, L = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                  cfg["num_hidden_layers"])
    qd = cfg["num_attention_heads"] * cfg["head_dim"]
    kvd = cfg["num_key_value_heads"] * cfg["head_dim"]
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(out / name))
        weight_map.update(dict.fromkeys(tensors, name))

    shard("model-embed.safetensors", {"model.embed_tokens.weight": rand(v, d),
                                      "model.norm.weight": np.ones(d, np.float32)})
    shard("model-head.safetensors", {"lm_head.weight": rand(v, d)})
    for i in range(L):
        p = f"model.layers.{i}."
        shard(f"model-layer{i:03d}.safetensors", {
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": rand(qd, d), p + "self_attn.k_proj.weight": rand(kvd, d),
            p + "self_attn.v_proj.weight": rand(kvd, d), p + "self_attn.o_proj.weight": rand(d, qd),
            p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f)})
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    largest = max(L * d * f, v * d, L * d * qd) * 4
    return BigModel(out, largest)
