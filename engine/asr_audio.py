"""Audio in: WAV bytes → mono float32 samples, and any sample rate → 16 kHz.

What the encoder takes is mono 16 kHz float32 in [-1, 1]. WAV (PCM 8/16/24/32-bit
integers or 32-bit float) is read with the standard library; other containers (MP3,
FLAC, Ogg) need a decoder this module does not have. Resampling is scipy's polyphase
filter (``resample_poly``), the usual choice for speech front ends.
"""

from __future__ import annotations

import io
import struct
import wave
from math import gcd

import numpy as np

from sgljax.engine.asr_features import SAMPLE_RATE


class AudioDecodeError(ValueError):
    pass


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of a WAV file's bytes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioDecodeError("not a WAV file (only WAV audio is decoded here)")
    fmt = _format_tag(data)
    if fmt == 3:  # IEEE float: the wave module refuses it, read the data chunk ourselves
        return _float_wav(data)
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise AudioDecodeError(f"cannot read the WAV file: {e}") from None
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise AudioDecodeError(f"unsupported WAV sample width {width} bytes")
    return _mono(x, channels), rate


def _chunks(data: bytes):
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        yield cid, data[at + 8:at + 8 + size]
        at += 8 + size + (size & 1)


def _format_tag(data: bytes) -> int:
    for cid, body in _chunks(data):
        if cid == b"fmt " and len(body) >= 16:
            tag = struct.unpack("<H", body[:2])[0]
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat's
                tag = struct.unpack("<H", body[24:26])[0]
            return tag
    raise AudioDecodeError("the WAV file has no fmt chunk")


def _float_wav(data: bytes) -> tuple[np.ndarray, int]:
    fmt = next(body for cid, body in _chunks(data) if cid == b"fmt ")
    channels, rate = struct.unpack("<HI", fmt[2:8])
    bits = struct.unpack("<H", fmt[14:16])[0]
    body = next((b for cid, b in _chunks(data) if cid == b"data"), None)
    if body is None or bits not in (32, 64):
        raise AudioDecodeError("unsupported float WAV (need 32- or 64-bit samples and data)")
    x = np.frombuffer(body[:len(body) - len(body) % (bits // 8)], "<f4" if bits == 32 else "<f8")
    return _mono(x.astype(np.float32), channels), rate


def _mono(x: np.ndarray, channels: int) -> np.ndarray:
    if channels > 1:
        x = x[:len(x) - len(x) % channels].reshape(-1, channels).mean(axis=1)
    return np.ascontiguousarray(x, np.float32)


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
    """WAV bytes → what the encoder takes: mono 16 kHz float32."""
    x, rate = decode_wav(data)
    return to_16k(x, rate)
