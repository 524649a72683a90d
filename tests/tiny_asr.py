"""A tiny random Qwen3-ASR checkpoint and synthesised test audio, for tests."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from tiny_models import QWEN_TOKENIZER_FILES, qwen_tokenizer_dir

SR = 16000


def _import_hub_kernels() -> None:
    """Import transformers' hub-kernels integration with the repo root off sys.path.

    Pytest puts the repo root on sys.path (it holds an __init__.py), where our ``kernels/``
    shadows the PyPI ``kernels`` package that transformers imports from there once the
    Qwen3-ASR processor loads; importing it now, with the real package, settles it."""
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    shadow = sys.modules.get("kernels")
    if shadow is not None and root in Path(getattr(shadow, "__file__", "") or "/").parents:
        del sys.modules["kernels"]
    try:
        import transformers.integrations.hub_kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_import_hub_kernels()
# Qwen3-ASR's added tokens at their ids in the released tokenizer (the Qwen3 tokenizer's
# 151,669 tokens come first); ids between them are filled with placeholders so that
# adding them in order lands each at its id.
ASR_TOKENS = {151669: ("<|audio_start|>", True), 151670: ("<|audio_end|>", True),
              151676: ("<|audio_pad|>", True), 151704: ("<asr_text>", False)}


def tiny_asr_config(**audio_overrides):
    import transformers as tf

    audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4,
                 encoder_ffn_dim=64, d_model=32, n_window=50, n_window_infer=200,
                 downsample_hidden_size=8, output_dim=64, initializer_range=0.2)
    audio.update(audio_overrides)
    text = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.1,
                rope_theta=1000000.0)
    return tf.Qwen3ASRConfig(audio_config=audio, text_config=text, initializer_range=0.1)


def asr_tokenizer(out: Path):
    """The Qwen3 tokenizer with Qwen3-ASR's audio tokens and ``<asr_text>`` at their ids,
    saved into ``out``; returns the HF tokenizer."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tmp = out / "_qwen3_tokenizer"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in QWEN_TOKENIZER_FILES:
        shutil.copy(qwen_tokenizer_dir() / name, tmp / name)
    tok = AutoTokenizer.from_pretrained(tmp)
    assert len(tok) == 151669, len(tok)
    for tid in range(151669, max(ASR_TOKENS) + 1):
        content, special = ASR_TOKENS.get(tid, (f"<|asr_reserved_{tid}|>", True))
        added = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens({"additional_special_tokens": [added]},
                                replace_extra_special_tokens=False)
         if special else tok.add_tokens([added]))
        assert tok.convert_tokens_to_ids(content) == tid, (content, tid)
    tok.save_pretrained(out)
    shutil.rmtree(tmp)
    return tok


def build_tiny_asr(out: Path, seed: int = 0, **audio_overrides) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Qwen3ASRForConditionalGeneration(tiny_asr_config(**audio_overrides)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    asr_tokenizer(out)
    return out


def hf_processor(model_dir: Path):
    """transformers' Qwen3ASRProcessor over the folder's tokenizer, with the released
    checkpoints' chat template (system turn always present, empty without a prompt)."""
    from transformers import AutoTokenizer, Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.audio_token, tok.audio_bos_token, tok.audio_eos_token = (
        "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>")
    return Qwen3ASRProcessor(Qwen3ASRFeatureExtractor(), tok, chat_template=CHAT_TEMPLATE)


# The layout of the released checkpoints' template (transformers' test_chat_template
# checks the same string): one system turn (empty unless a prompt is given), the audio
# in the user turn, and the assistant turn.
CHAT_TEMPLATE = (
    "{%- set sys = namespace(text='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- for c in m['content'] -%}{%- set sys.text = sys.text + c['text'] -%}{%- endfor -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\\n' + sys.text + '<|im_end|>\\n' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- else -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def synth_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Tones and noise, float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    freqs = rng.uniform(100, 3000, size=3)
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) * rng.uniform(0.1, 0.4)
            for f in freqs)
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))  # a slow envelope
    return (x + rng.normal(0, 0.02, n)).astype(np.float32)


def hf_config_dict(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
