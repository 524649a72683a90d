"""Qwen3-ASR audio encoder time per window bucket, random weights, on this machine's devices.

    python benchmarks/asr_encoder.py --size 1.7b --buckets 1 2 4

A bucket is a count of attention windows (800 mel frames = 8 s each in the released
models); a call runs one bucket. Prints compile seconds and the median of ``--repeat``
timed calls per bucket, as one JSON line per bucket.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sgljax.engine.asr_config import AudioEncoderConfig
from sgljax.engine.asr_encoder import LAYER_TENSORS, sinusoid_positions
from sgljax.engine.asr_features import audio_features
from sgljax.engine.asr_runner import AudioEncoderRunner
from sgljax.engine.mesh import make_mesh

# The released Qwen3-ASR-1.7B encoder's dimensions (transformers' defaults), and a tiny one.
SIZES = {
    "1.7b": dict(encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096,
                 d_model=1024, output_dim=2048, downsample_hidden_size=480),
    "tiny": dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=64, downsample_hidden_size=8),
}


def random_params(cfg: AudioEncoderConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    r = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02)  # noqa: E731
    h, d, f, L = cfg.downsample_hidden_size, cfg.d_model, cfg.ffn_dim, cfg.num_layers
    shapes = {"ln1_w": (d,), "ln1_b": (d,), "q_w": (d, d), "q_b": (d,), "k_w": (d, d),
              "k_b": (d,), "v_w": (d, d), "v_b": (d,), "o_w": (d, d), "o_b": (d,),
              "ln2_w": (d,), "ln2_b": (d,), "fc1_w": (f, d), "fc1_b": (f,), "fc2_w": (d, f),
              "fc2_b": (d,)}
    assert set(shapes) == set(LAYER_TENSORS)
    return {
        "conv1_w": r(h, 1, 3, 3), "conv1_b": r(h), "conv2_w": r(h, h, 3, 3), "conv2_b": r(h),
        "conv3_w": r(h, h, 3, 3), "conv3_b": r(h), "conv_out": r(d, h * cfg.conv_freq_bins),
        "ln_post_w": np.ones(d, np.float32), "ln_post_b": r(d),
        "proj1_w": r(d, d), "proj1_b": r(d), "proj2_w": r(cfg.output_dim, d),
        "proj2_b": r(cfg.output_dim),
        "layers": {k: r(L, *s) for k, s in shapes.items()},
        "positions": sinusoid_positions(cfg.max_position_embeddings, d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.7b")
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cfg = AudioEncoderConfig.from_hf_dict(SIZES[a.size])
    runner = AudioEncoderRunner(cfg, random_params(cfg), make_mesh(1),
                                window_buckets=a.buckets)
    rng = np.random.default_rng(0)
    for b in a.buckets:
        compile_s = runner.warmup([b])[0][1]
        seconds = b * runner.window_frames / 100  # a clip that fills the bucket exactly
        clip = audio_features((0.1 * rng.standard_normal(int(seconds * 16000))).astype(
            np.float32), cfg)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            runner.encode([clip])
            times.append(time.perf_counter() - t0)
        print(json.dumps({"size": a.size, "windows": b, "audio_s": seconds,
                          "compile_s": round(compile_s, 2),
                          "median_s": round(float(np.median(times)), 4),
                          "tokens": clip.num_tokens}), flush=True)


if __name__ == "__main__":
    main()
