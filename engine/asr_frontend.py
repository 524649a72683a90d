"""The engine's audio front end (Qwen3-ASR checkpoints): clips in, prompt embeddings out.

``prepare`` runs when a request is added: features on the host, the prompt's
placeholders checked (or expanded: one ``<|audio_pad|>`` per clip becomes one per
encoder output), and the prefix cache's view of the prompt. ``encode_pending`` runs
before each schedule: every waiting request's clips in one encoder batch (engine/
asr_runner.py), the outputs kept on the Sequence so preemption never re-encodes. The
model runner then puts them in place of the placeholders' embeddings at prefill.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sgljax.engine.asr_config import AsrConfig
from sgljax.engine.asr_features import SAMPLE_RATE, AudioFeatures, audio_features
from sgljax.engine.asr_loader import load_audio_params
from sgljax.engine.asr_prompt import expand_audio_pads, prompt_text
from sgljax.engine.asr_runner import AudioEncoderRunner
from sgljax.engine.request import Sequence
from sgljax.engine.sampling_params import RequestError

MAX_CLIP_SECONDS = 20 * 60  # longer audio: split it first (one request per piece)


@dataclass(frozen=True)
class PreparedClip:
    """A checked clip: its features, and the id its placeholders carry in the prefix cache
    (a hash of the samples: the same audio shares cached pages, other audio never)."""
    features: AudioFeatures
    key: int


class AudioFrontend:
    def __init__(self, cfg: AsrConfig, model_path: str | Path, mesh, max_windows: int = 16):
        self.cfg = cfg
        self.runner = AudioEncoderRunner(cfg.encoder, load_audio_params(model_path, cfg), mesh,
                                         max_windows=max_windows)
        self.clips_encoded = 0

    @classmethod
    def maybe(cls, model_path: str | Path, mesh, **kwargs) -> AudioFrontend | None:
        """The front end for an ASR checkpoint folder; None for a text-only model."""
        cfg = AsrConfig.from_dir(model_path)
        return cls(cfg, model_path, mesh, **kwargs) if cfg is not None else None

    def transcription_ids(self, tokenizer, num_clips: int = 1, language: str | None = None,
                          context: str | None = None) -> list[int]:
        """The transcription prompt (one placeholder per clip, expanded by ``prepare``)."""
        try:
            text = prompt_text(num_clips, language, context)
        except ValueError as e:
            raise RequestError(str(e), "language") from None
        return tokenizer.encode(text, add_special_tokens=False)

    def prepare_clip(self, samples: np.ndarray) -> PreparedClip:
        """Check one clip and compute what the engine needs of it. Pure and thread-safe:
        servers call it in their worker threads, off the engine's step loop."""
        a = np.asarray(samples, np.float32)
        if a.ndim != 1 or not a.size:
            raise RequestError("audio must be non-empty mono samples (1-D)", "audio")
        if a.size > MAX_CLIP_SECONDS * SAMPLE_RATE:
            raise RequestError(f"audio clips are limited to {MAX_CLIP_SECONDS} s", "audio")
        if not np.isfinite(a).all():
            raise RequestError("audio samples must be finite", "audio")
        key = -1 - int.from_bytes(hashlib.blake2b(a.tobytes(), digest_size=7).digest(), "big")
        return PreparedClip(audio_features(a, self.cfg.encoder), key)

    def prepare(self, ids: list[int], audio: Iterable) -> tuple[list[int], dict]:
        """(prompt ids with every placeholder expanded, the Sequence's audio fields).
        ``audio``: samples, or clips ``prepare_clip`` already made."""
        clips = [a if isinstance(a, PreparedClip) else self.prepare_clip(a) for a in audio]
        pad = self.cfg.audio_token_id
        counts = [c.features.num_tokens for c in clips]
        have = sum(t == pad for t in ids)
        if have == len(clips) and have != sum(counts):  # one placeholder per clip: expand
            ids = expand_audio_pads(ids, pad, counts)
        elif have != sum(counts):
            raise RequestError(f"the prompt has {have} <|audio_pad|> tokens for {len(clips)} "
                               f"clip(s) of {sum(counts)} encoder outputs", "prompt")
        positions = np.flatnonzero(np.asarray(ids) == pad)
        cache_ids = list(ids)
        at = 0
        for clip, n in zip(clips, counts):  # this clip's placeholders: an id of its own
            for p in positions[at:at + n]:
                cache_ids[p] = clip.key
            at += n
        return ids, dict(audio_clips=[c.features for c in clips], audio_positions=positions,
                         audio_cache_ids=cache_ids)

    def encode_pending(self, seqs: Iterable[Sequence]) -> int:
        """Encode every clip of ``seqs`` not yet encoded, in one batch; returns how many
        requests got their encoder outputs."""
        todo = [s for s in seqs if s.audio_clips is not None and s.audio_embeds is None]
        if not todo:
            return 0
        clips = [c for s in todo for c in s.audio_clips]
        self.clips_encoded += len(clips)
        outs = iter(self.runner.encode(clips))
        for s in todo:
            parts = [next(outs) for _ in s.audio_clips]
            s.audio_embeds = np.concatenate(parts) if parts else None
            s.audio_clips = None  # features are no longer needed
        return len(todo)
