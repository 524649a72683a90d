"""Runs the audio encoder on the device: clips' windows batched into window-count buckets.

Every clip becomes whole attention windows (engine/asr_features.py); a batch of clips
is their windows stacked, padded to the next bucket (powers of two up to
``max_windows``), so the encoder is compiled per bucket, ahead of time, and never per
clip length. A batch larger than the biggest bucket runs as several.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sgljax.engine.asr_config import AudioEncoderConfig
from sgljax.engine.asr_encoder import encode_windows
from sgljax.engine.asr_features import AudioFeatures
from sgljax.engine.buckets import pick, powers_of_two

log = logging.getLogger(__name__)


class AudioEncoderRunner:
    def __init__(self, cfg: AudioEncoderConfig, params: dict, mesh, max_windows: int = 16,
                 window_buckets: list[int] | None = None):
        self.cfg = cfg
        self.mesh = mesh
        replicated = NamedSharding(mesh, P())
        self.params = jax.tree.map(lambda a: jax.device_put(a, replicated), params)
        self.buckets = sorted(window_buckets or powers_of_two(1, max_windows))
        self._fn = jax.jit(partial(encode_windows, cfg), out_shardings=(replicated, replicated))
        self._executables: dict[int, object] = {}
        self.warmed_up = False
        self.unwarmed_shapes = 0  # buckets first compiled after warmup (0 when healthy)
        self.calls = 0

    @property
    def window_frames(self) -> int:
        return self.cfg.chunks_per_window * self.cfg.chunk_frames

    def bucket_for_frames(self, frames: int) -> int:
        """The bucket one clip of ``frames`` mel frames runs in (the biggest, for a clip
        longer than it: such a clip runs as several calls of it)."""
        windows = -(-max(frames, 1) // self.window_frames)
        return pick(self.buckets, min(windows, self.buckets[-1]))

    def _executable(self, windows: int):
        exe = self._executables.get(windows)
        if exe is None:
            if self.warmed_up:
                self.unwarmed_shapes += 1
                log.warning("compiling a new audio encoder bucket after warmup: %d windows",
                            windows)
            shape = (windows, self.cfg.num_mel_bins, self.window_frames)
            args = (jax.ShapeDtypeStruct(shape, np.float32),
                    jax.ShapeDtypeStruct((windows,), np.int32))
            with jax.set_mesh(self.mesh):
                exe = self._fn.lower(self.params, *args).compile()
            self._executables[windows] = exe
        return exe

    def warmup(self, buckets: list[int] | None = None) -> list[tuple[int, float]]:
        """Compile every bucket (or the given ones); returns (windows, seconds) each."""
        out = []
        self.warmed_up = False  # compiles now are warmup's, not misses
        for b in buckets or self.buckets:
            t0 = time.perf_counter()
            self._executable(b)
            out.append((b, time.perf_counter() - t0))
        self.warmed_up = True
        return out

    def encode(self, clips: list[AudioFeatures]) -> list[np.ndarray]:
        """Each clip's encoder outputs, (num_tokens, output_dim) float32 on the host, in the
        order of the prompt's ``<|audio_pad|>`` tokens.

        Windows are independent, so every clip's windows go into one stream, cut into
        calls of the buckets ``call_sizes`` picks (a long clip may span several)."""
        if not clips:
            return []
        span = self.window_frames
        windows = np.concatenate([c.windows for c in clips])
        valid = np.concatenate([np.clip(c.frames - np.arange(c.num_windows) * span, 0, span)
                                for c in clips]).astype(np.int32)
        tokens, masks = [], []
        at = 0
        for size in self.call_sizes(len(windows)):
            t, m = self._run(windows[at:at + size], valid[at:at + size])
            tokens.append(t)
            masks.append(m)
            at += size
        tokens, masks = np.concatenate(tokens), np.concatenate(masks)
        out, at = [], 0
        for clip in clips:
            w = clip.num_windows
            got = tokens[at:at + w][masks[at:at + w]]  # real tokens, in clip order
            assert got.shape[0] == clip.num_tokens, (got.shape, clip.num_tokens)
            out.append(got)
            at += w
        return out

    def call_sizes(self, n: int) -> list[int]:
        """Windows per call for ``n`` windows: pieces of the biggest usable bucket, the last
        one padded to the smallest usable bucket that holds it. After warmup only warmed
        buckets are usable, so clips whose windows sum to an unwarmed bucket run as
        warmed calls instead of compiling."""
        biggest = self.usable_buckets[-1]
        sizes = []
        while n > 0:
            sizes.append(min(n, biggest))
            n -= sizes[-1]
        return sizes

    @property
    def usable_buckets(self) -> list[int]:
        """Every bucket before warmup; the warmed ones after it."""
        return sorted(self._executables) if self.warmed_up and self._executables else self.buckets

    def _run(self, windows: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One encoder call over up to the biggest usable bucket's windows, padded to the
        smallest usable bucket that holds them."""
        n = len(windows)
        bucket = pick(self.usable_buckets, n)
        batch = np.zeros((bucket, *windows.shape[1:]), np.float32)
        batch[:n] = windows
        frames = np.zeros((bucket,), np.int32)
        frames[:n] = valid
        self.calls += 1
        tokens, mask = self._executable(bucket)(self.params, batch, frames)
        return np.asarray(tokens)[:n], np.asarray(mask)[:n]
