"""Log-mel features of 16 kHz audio, on the host with numpy, as Qwen3-ASR was trained on.

The numerics of transformers' ``Qwen3ASRFeatureExtractor`` as its processor calls it
for one clip (no padding to the batch's longest): clips under 0.5 s are zero-padded,
a centred (reflect-padded) 400-sample Hann STFT every 160 samples, the power
spectrum through 128 Slaney mel filters up to 8 kHz, log10 floored 8 below the clip's
maximum and scaled ``(x + 4) / 4``. One clip's features never depend on another's, so
a batch of requests gets the same features as each alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sgljax.engine.asr_config import AudioEncoderConfig, conv_out_len

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
MIN_SAMPLES = 8000  # shorter clips are zero-padded (the original Qwen3-ASR library does)


def _hz_to_mel(f):
    """Slaney's mel scale: linear to 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    step = 200.0 / 3
    log_step = np.log(6.4) / 27.0
    return np.where(f < 1000.0, f / step, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / log_step)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    step = 200.0 / 3
    log_step = np.log(6.4) / 27.0
    return np.where(m < 15.0, m * step, 1000.0 * np.exp(log_step * (m - 15.0)))


def mel_filters(num_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                fmax: float = 8000.0) -> np.ndarray:
    """(n_fft // 2 + 1, num_mels) triangular filters, Slaney-normalised (equal area)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), num_mels + 2))
    width = np.diff(edges)
    offset = edges[None, :] - freqs[:, None]  # (freqs, edges)
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_FILTERS: dict[int, np.ndarray] = {}
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
_BLOCK = 4096  # STFT frames per block


def log_mel(audio: np.ndarray, num_mels: int = 128) -> np.ndarray:
    """(num_mels, frames) float32 features of one mono 16 kHz clip; frames = samples // 160
    (after padding clips under MIN_SAMPLES)."""
    x = np.asarray(audio, np.float32).reshape(-1)
    if x.size < MIN_SAMPLES:
        x = np.pad(x, (0, MIN_SAMPLES - x.size))
    x = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    frames = frames[:-1]  # the STFT's last frame is dropped, as Whisper-style extractors do
    if num_mels not in _FILTERS:
        _FILTERS[num_mels] = mel_filters(num_mels)
    filters = _FILTERS[num_mels]
    mel = np.empty((len(frames), num_mels))
    for at in range(0, len(frames), _BLOCK):  # in blocks: a 20-minute clip's frames at once
        block = frames[at:at + _BLOCK] * _WINDOW  # would take about 0.4 GB of float64
        mel[at:at + _BLOCK] = (np.abs(np.fft.rfft(block, axis=-1)) ** 2) @ filters
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).T.astype(np.float32)


def num_audio_tokens(frames: int, cfg: AudioEncoderConfig) -> int:
    """Encoder outputs for ``frames`` mel frames: 13 per full chunk plus the partial one's."""
    full, rest = divmod(frames, cfg.chunk_frames)
    return full * cfg.tokens_per_chunk + conv_out_len(rest)


@dataclass
class AudioFeatures:
    """One clip's features, cut into the encoder's attention windows.

    ``windows`` (W, mels, chunks_per_window * chunk_frames), zero past the clip's frames
    (the zeros the encoder's convolutions see in a clip's last chunk, as in
    transformers); ``frames`` the clip's mel frames; ``num_tokens`` its encoder outputs.
    """
    windows: np.ndarray
    frames: int
    num_tokens: int

    @property
    def num_windows(self) -> int:
        return self.windows.shape[0]


def audio_features(audio: np.ndarray, cfg: AudioEncoderConfig) -> AudioFeatures:
    feats = log_mel(audio, cfg.num_mel_bins)
    frames = feats.shape[1]
    span = cfg.chunks_per_window * cfg.chunk_frames
    num_windows = -(-frames // span)
    padded = np.zeros((cfg.num_mel_bins, num_windows * span), np.float32)
    padded[:, :frames] = feats
    windows = padded.reshape(cfg.num_mel_bins, num_windows, span).transpose(1, 0, 2)
    return AudioFeatures(np.ascontiguousarray(windows), frames, num_audio_tokens(frames, cfg))
