"""The engine's speech-recognition API (Qwen3-ASR checkpoints): transcription prompts,
clip preparation, ``transcribe``, and warming the audio path. A part of
engine/engine.py's ``Engine`` (mixed in); the state it uses is the engine's
(``audio``, ``runner``, ``plan``, ``compile_stats``).
"""

from __future__ import annotations

import time

import numpy as np

from sgljax.engine.asr_prompt import parse_transcription
from sgljax.engine.sampling_params import RequestError, SamplingParams


class SpeechAPI:
    def transcription_prompt(self, num_clips: int = 1, language: str | None = None,
                             context: str | None = None) -> list[int]:
        """Prompt ids asking to transcribe ``num_clips`` clips (pass them as ``audio``):
        ``language`` (a name or ISO code) forces the language, ``context`` (hotwords,
        domain text) is the system turn."""
        if self.audio is None:
            raise RequestError("this model does not take audio", "audio")
        return self.audio.transcription_ids(self.tokenizer, num_clips, language, context)

    def prepare_audio(self, clips: list[np.ndarray]) -> list:
        """Check clips (mono 16 kHz float32) and compute their features, for ``add_request``'s
        ``audio``; each knows its prompt tokens (``.features.num_tokens``). Thread-safe:
        servers call it in worker threads, so the step loop never does this work."""
        if self.audio is None:
            raise RequestError("this model does not take audio", "audio")
        return [self.audio.prepare_clip(c) for c in clips]

    def transcribe(self, clips: list, language: str | None = None, context: str | None = None,
                   params: SamplingParams | None = None) -> list[dict]:
        """Transcribe each clip (one request each, run together); returns [{"text",
        "language", "raw", "token_ids", "finish_reason"}]: the transcription, the language
        detected (or forced), and the model's answer as it wrote it."""
        params = params or SamplingParams(temperature=0, max_tokens=448)
        prompt = self.transcription_prompt(1, language, context)
        outs = self.generate([prompt] * len(clips), params, audio=[[c] for c in clips])
        results = []
        for o in outs:
            t = parse_transcription(o["text"], language)
            results.append({"text": t.text, "language": t.language, "raw": o["text"],
                            "token_ids": o["token_ids"], "finish_reason": o["finish_reason"]})
        return results

    def warmup_asr(self, frame_paddings: list[int] | None = None,
                   token_paddings: list[int] | None = None) -> dict:
        """Precompile what audio requests need, then transcribe self-made audio to prove it.

        ``frame_paddings``: clip lengths in mel frames (100 a second) to expect; each
        compiles the encoder bucket its windows fall in (default: every bucket).
        ``token_paddings``: token buckets whose audio-embedding form to compile (default:
        every one of the plan's). Then one clip of each length is transcribed
        (one token) to run the whole path; ``unwarmed`` counts what that still compiled.
        """
        if self.audio is None:
            raise RequestError("this model does not take audio", "audio")
        t0 = time.perf_counter()
        enc = self.audio.runner
        frames = sorted(frame_paddings or [b * enc.window_frames for b in enc.buckets])
        buckets = [b for b, _ in self._warm_encoder(frames)]
        Ts = set(token_paddings or self.plan.token_buckets)
        shapes = [(T, S, P) for T, S, P in self.plan.all_shapes() if T in Ts]
        for T, S, P in shapes:
            self.runner.warmup_shape(T, S, P, embeds=True)
        before = self.compile_stats.compiles + enc.unwarmed_shapes
        rng = np.random.default_rng(0)
        clips = [(0.1 * rng.standard_normal(f * 160)).astype(np.float32) for f in frames]
        self.transcribe(clips, "en", params=SamplingParams(max_tokens=1, temperature=0))
        self.flush_cache()  # the made-up audio is no prefix anyone will share
        return {"encoder_buckets": buckets, "audio_shapes": len(shapes),
                "unwarmed": self.compile_stats.compiles + enc.unwarmed_shapes - before,
                "seconds": round(time.perf_counter() - t0, 2)}

    def _warm_encoder(self, frame_paddings: list[int] | None) -> list[tuple[int, float]]:
        """Compile the audio encoder's buckets for these clip lengths (mel frames; None:
        every bucket); returns (windows, seconds) per bucket. None for text models."""
        if self.audio is None:
            return []
        enc = self.audio.runner
        buckets = (sorted({enc.bucket_for_frames(f) for f in frame_paddings})
                   if frame_paddings else None)
        return enc.warmup(buckets)

    def unwarmed_audio_shapes(self) -> int:
        """Audio encoder buckets compiled after their warmup (0 when serving is healthy)."""
        return self.audio.runner.unwarmed_shapes if self.audio is not None else 0
