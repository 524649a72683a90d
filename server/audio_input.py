"""Audio in requests → mono 16 kHz float32 clips for the engine.

Chat messages carry audio as content parts (``audio_url`` with a ``data:audio/...;base64``
URL, or OpenAI's ``input_audio`` with base64 ``data`` and a ``format``);
``/v1/audio/transcriptions`` as a multipart file. engine/asr_audio.py decodes and
resamples; every failure is a 400 naming the field.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from sgljax.engine.asr_audio import AudioDecodeError, load_audio
from sgljax.server.errors import bad_request

MAX_AUDIOS_PER_REQUEST = 8
MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's limit for an uploaded file


def decode_audio(data: bytes, param: str) -> np.ndarray:
    """An audio file's bytes → mono 16 kHz float32 samples; a 400 naming ``param``."""
    if len(data) > MAX_AUDIO_BYTES:
        raise bad_request(f"the audio is larger than {MAX_AUDIO_BYTES >> 20} MiB", param)
    try:
        return load_audio(data)
    except AudioDecodeError as e:
        raise bad_request(str(e), param) from None


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the audio is not valid base64", param) from None


def audio_part(part: dict, param: str) -> np.ndarray:
    """A chat content part of type audio_url or input_audio → samples."""
    if part.get("type") == "input_audio":
        body = part.get("input_audio")
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise bad_request('input_audio needs {"data": base64, "format": ...}', param)
        return decode_audio(_b64(body["data"], param), param)
    body = part.get("audio_url")
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str):
        raise bad_request('audio_url needs {"url": "data:audio/...;base64,..."}', param)
    if not url.startswith("data:"):
        raise bad_request("only data: URLs are accepted for audio (this server fetches "
                          "nothing)", param)
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request("an audio data URL must be base64 (data:audio/wav;base64,...)", param)
    return decode_audio(_b64(payload, param), param)


def is_audio_part(part: dict) -> bool:
    return part.get("type") in ("audio_url", "input_audio")


MAX_PIECE_SECONDS = 30.0  # longer audio is transcribed in pieces of at most this
SEARCH_SECONDS = 5.0  # each cut goes at the quietest 100 ms in the last seconds of a piece


def split_long_audio(samples: np.ndarray, rate: int = 16000) -> list[tuple[int, int]]:
    """(start, end) sample ranges covering ``samples``: pieces of at most 30 s, each cut
    placed at the lowest-energy 100 ms frame of its last 5 s (between words, most
    often), as speech front ends split long recordings before a 30 s model."""
    n, longest = len(samples), int(MAX_PIECE_SECONDS * rate)
    frame, search = rate // 10, int(SEARCH_SECONDS * rate)
    pieces, start = [], 0
    while n - start > longest:
        lo = start + longest - search
        window = samples[lo:start + longest]
        usable = len(window) // frame * frame
        energy = (window[:usable].reshape(-1, frame) ** 2).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces
