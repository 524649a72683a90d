"""Qwen3-ASR's configuration: the audio encoder's dataclass, its special tokens, and the
text decoder's config and weight names inside an ASR checkpoint.

A Qwen3-ASR checkpoint (``Qwen3ASRForConditionalGeneration``) is an audio encoder, a
two-layer projector, and a plain Qwen3 decoder: the decoder is served by
engine/model.py as it is; this file says where its config and weights sit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASR_ARCHITECTURES = ("Qwen3ASRForConditionalGeneration",)

# The stored-name prefixes of the text decoder's tensors, by checkpoint kind, and what the
# engine's decoder loader calls them: transformers' save_pretrained writes
# ``model.language_model.*`` (+ ``lm_head.weight`` when untied); the original Qwen3-ASR
# release nests everything under ``thinker.``.
TEXT_PREFIXES = {"model.language_model.": "model.", "thinker.model.": "model.",
                 "thinker.lm_head.": "lm_head."}
# Where the encoder and the projector are stored, by checkpoint kind.
AUDIO_PREFIXES = ("model.audio_tower.", "thinker.audio_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.",)


def is_asr_config(cfg: dict) -> bool:
    return any(a in ASR_ARCHITECTURES for a in cfg.get("architectures") or []) or (
        cfg.get("model_type") == "qwen3_asr")


def _thinker(cfg: dict) -> dict:
    """The original release wraps the model config in ``thinker_config``."""
    return cfg.get("thinker_config") or cfg


def text_config_dict(cfg: dict) -> dict:
    """An ASR config.json → the Qwen3ForCausalLM config.json its decoder is."""
    top = _thinker(cfg)
    text = dict(top["text_config"])
    text["architectures"] = ["Qwen3ForCausalLM"]
    # Sub-configs may leave these to the top level (transformers puts eos/pad there).
    for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id"):
        if text.get(key) is None and top.get(key, cfg.get(key)) is not None:
            text[key] = top.get(key, cfg.get(key))
    return text


def text_tensor_name(stored: str) -> str | None:
    """A stored tensor name → the name the decoder loader asks for (None: not the decoder's)."""
    for prefix, engine_prefix in TEXT_PREFIXES.items():
        if stored.startswith(prefix):
            return engine_prefix + stored[len(prefix):]
    return None


@dataclass(frozen=True)
class AudioEncoderConfig:
    num_mel_bins: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    d_model: int
    output_dim: int  # = the decoder's hidden size: the projector maps into its embeddings
    downsample_hidden_size: int
    n_window: int  # a conv chunk is 2 * n_window mel frames
    n_window_infer: int  # attention windows span this many mel frames (whole chunks)
    max_position_embeddings: int  # positions within a chunk (13 for 100-frame chunks)
    activation: str = "gelu"
    scale_embedding: bool = False

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def chunks_per_window(self) -> int:
        return self.n_window_infer // self.chunk_frames

    @property
    def tokens_per_chunk(self) -> int:
        """Encoder outputs of one full chunk: three stride-2 convolutions."""
        return conv_out_len(self.chunk_frames)

    @property
    def conv_freq_bins(self) -> int:
        """Mel bins left after the three stride-2 convolutions."""
        return conv_out_len(self.num_mel_bins)

    @classmethod
    def from_hf_dict(cls, audio: dict) -> AudioEncoderConfig:
        out = cls(
            num_mel_bins=audio.get("num_mel_bins", 128),
            num_layers=audio["encoder_layers"],
            num_heads=audio["encoder_attention_heads"],
            ffn_dim=audio["encoder_ffn_dim"],
            d_model=audio["d_model"],
            output_dim=audio["output_dim"],
            downsample_hidden_size=audio.get("downsample_hidden_size", 480),
            n_window=audio.get("n_window", 50),
            n_window_infer=audio.get("n_window_infer", 800),
            max_position_embeddings=audio.get("max_position_embeddings", 13),
            activation=audio.get("activation_function", "gelu"),
            scale_embedding=bool(audio.get("scale_embedding", False)),
        )
        if out.n_window_infer % out.chunk_frames:
            raise ValueError(f"n_window_infer {out.n_window_infer} is not a multiple of "
                             f"2 * n_window ({out.chunk_frames})")
        if out.activation != "gelu":
            raise ValueError(f"audio encoder activation {out.activation!r} is not supported")
        if out.tokens_per_chunk > out.max_position_embeddings:
            raise ValueError("a chunk has more outputs than the encoder has positions")
        return out


def conv_out_len(n: int) -> int:
    """Length after three (kernel 3, stride 2, padding 1) convolutions; 0 stays 0."""
    for _ in range(3):
        n = (n - 1) // 2 + 1 if n > 0 else 0
    return n


@dataclass(frozen=True)
class AsrConfig:
    """What the engine needs beyond the decoder to serve a Qwen3-ASR checkpoint."""
    encoder: AudioEncoderConfig
    audio_token_id: int = 151676  # <|audio_pad|>: one per encoder output in the prompt
    audio_start_id: int = 151669  # <|audio_start|>
    audio_end_id: int = 151670  # <|audio_end|>

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> AsrConfig:
        top = _thinker(cfg)
        return cls(AudioEncoderConfig.from_hf_dict(top["audio_config"]),
                   audio_token_id=top.get("audio_token_id", cfg.get("audio_token_id", 151676)),
                   audio_start_id=top.get("audio_start_token_id", 151669),
                   audio_end_id=top.get("audio_end_token_id", 151670))

    @classmethod
    def from_dir(cls, path: str | Path) -> AsrConfig | None:
        """The folder's ASR config, or None for a text-only model."""
        cfg = json.loads((Path(path) / "config.json").read_text())
        return cls.from_hf_dict(cfg) if is_asr_config(cfg) else None
