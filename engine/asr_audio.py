"""Audio in: an audio file's bytes → mono float32 samples, and any sample rate → 16 kHz.

What the encoder takes is mono 16 kHz float32 in [-1, 1]. Files are decoded with
soundfile (libsndfile: WAV, FLAC, Ogg/Vorbis/Opus, MP3 and more); channels are averaged.
Resampling is scipy's polyphase filter (``resample_poly``), the usual choice for speech
front ends.
"""

from __future__ import annotations

import io
from math import gcd

import numpy as np

from sgljax.engine.asr_features import SAMPLE_RATE


class AudioDecodeError(ValueError):
    pass


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate) of an audio file's bytes."""
    import soundfile

    if not data:
        raise AudioDecodeError("the audio is empty")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioDecodeError(f"cannot decode the audio (WAV, FLAC, Ogg or MP3 expected): "
                               f"{e}") from None
    if rate <= 0:
        raise AudioDecodeError(f"the audio's sample rate is {rate}")
    if samples.shape[0] == 0:
        raise AudioDecodeError("the audio has no samples")
    mono = np.ascontiguousarray(samples.mean(axis=1), np.float32)
    if not np.isfinite(mono).all():
        raise AudioDecodeError("the audio has samples that are not finite")
    return mono, int(rate)


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples at ``rate`` Hz → 16 kHz float32."""
    x = np.asarray(samples, np.float32)
    if rate == SAMPLE_RATE:
        return x
    if rate <= 0:
        raise AudioDecodeError(f"bad sample rate {rate}")
    from scipy.signal import resample_poly

    g = gcd(int(rate), SAMPLE_RATE)
    return resample_poly(x, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


def load_audio(data: bytes) -> np.ndarray:
    """Audio file bytes → what the encoder takes: mono 16 kHz float32."""
    x, rate = decode_audio(data)
    return to_16k(x, rate)
