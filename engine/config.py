"""Model configuration: one dataclass read from an HF ``config.json``.

One decoder serves Qwen3, Qwen2, Llama and their mixture-of-experts forms
(Qwen3-MoE, Qwen2-MoE); the differences are switches here (q/k RMSNorm, qkv bias,
tied embeddings, rope scaling, which layers are sparse and how they route).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sgljax.engine.asr_config import is_asr_config, text_config_dict

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class ModelConfigError(ValueError):
    """The model's configuration cannot be served."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Mixture of experts (num_experts 0: every layer dense). moe_layers[i] says whether
    # layer i is sparse (HF: decoder_sparse_step and mlp_only_layers).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    moe_layers: tuple[bool, ...] = ()

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def layer_runs(self) -> list[tuple[bool, int, int, int]]:
        """Consecutive layers of one kind: (is_moe, first layer, layer count, index of the
        first in its kind's stack). Dense models have one run."""
        runs: list[list] = []
        seen = {False: 0, True: 0}
        for i, sparse in enumerate(self.moe_layers or (False,) * self.num_layers):
            if runs and runs[-1][0] == sparse:
                runs[-1][2] += 1
            else:
                runs.append([sparse, i, 1, seen[sparse]])
            seen[sparse] += 1
        return [tuple(r) for r in runs]

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        if is_asr_config(cfg):  # Qwen3-ASR: its text side is a plain Qwen3 decoder
            cfg = text_config_dict(cfg)
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"sgljax serves {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if family == "qwen2":
            qkv_bias = True
        elif family == "qwen2_moe":
            qkv_bias = bool(cfg.get("qkv_bias", True))
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        # transformers 5 moves rope settings into ``rope_parameters``.
        rope_params = cfg.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ModelConfigError(f"unsupported rope_scaling type {kind!r}")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=family in ("qwen3", "qwen3_moe"),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **_moe_fields(cfg, family),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelConfigError(f"{path}: no config.json")
        return cls.from_hf_dict(json.loads(cfg_path.read_text()))

    def param_count(self) -> int:
        """Every parameter the engine stores (all experts), at the model's own KV heads."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * hd * (h + 2 * kv) + h * hd * d + 2 * d
        attn += hd * (h + 2 * kv) if self.qkv_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        sparse = d * self.num_experts + self.num_experts * 3 * d * self.moe_intermediate_size
        if self.shared_expert_intermediate_size:
            sparse += 3 * d * self.shared_expert_intermediate_size + d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * attn + self.num_dense_layers * 3 * d * f
                + self.num_moe_layers * sparse + emb + d)


def _moe_fields(cfg: dict, family: str) -> dict:
    """The MoE switches of an HF config (none for dense families)."""
    if not family.endswith("_moe"):
        return {}
    # transformers 5 writes num_local_experts; hub checkpoints say num_experts.
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    step = cfg.get("decoder_sparse_step") or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    layers = cfg["num_hidden_layers"]
    moe_layers = tuple(experts > 0 and i not in dense_only and (i + 1) % step == 0
                       for i in range(layers))
    return dict(num_experts=experts, experts_per_token=cfg.get("num_experts_per_tok", 0),
                moe_intermediate_size=cfg.get("moe_intermediate_size", 0),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=(
                    cfg.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0),
                moe_layers=moe_layers)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies for rotary embeddings, with Llama-3 / linear scaling."""
    import numpy as np

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv.astype(np.float32)
    kind = rs.get("rope_type", rs.get("type"))
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "llama3":
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv.astype(np.float32)
