"""Qwen3-ASR's audio encoder and projector: pure functions over a params pytree.

Mel features are cut into 100-frame chunks (engine/asr_features.py); three stride-2
3x3 convolutions turn each chunk into 13 tokens, which get the chunk-local sinusoid
positions; transformer layers attend within windows of ``chunks_per_window`` chunks
(a clip's tokens never see another window's, nor another clip's); a final LayerNorm
and a two-layer GELU projector map them into the decoder's embedding space.

Because a window is self-contained, a batch is just windows: the windows of every
clip in the batch, stacked and padded to a bucket of window counts, so the encoder
compiles once per bucket and never per clip length. Each window carries how many of
its mel frames are real; the outputs of padding positions (the tail of a clip's last
chunk, whole padding chunks and windows) are masked out of attention and dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sgljax.engine.asr_config import AudioEncoderConfig

Params = dict[str, jax.Array]

# engine name → stored name under the encoder's prefix (per layer: "layers.{i}." first)
TOP_TENSORS = {
    "conv1_w": "conv2d1.weight", "conv1_b": "conv2d1.bias",
    "conv2_w": "conv2d2.weight", "conv2_b": "conv2d2.bias",
    "conv3_w": "conv2d3.weight", "conv3_b": "conv2d3.bias",
    "conv_out": "conv_out.weight",
    "ln_post_w": "ln_post.weight", "ln_post_b": "ln_post.bias",
}
LAYER_TENSORS = {
    "ln1_w": "self_attn_layer_norm.weight", "ln1_b": "self_attn_layer_norm.bias",
    "q_w": "self_attn.q_proj.weight", "q_b": "self_attn.q_proj.bias",
    "k_w": "self_attn.k_proj.weight", "k_b": "self_attn.k_proj.bias",
    "v_w": "self_attn.v_proj.weight", "v_b": "self_attn.v_proj.bias",
    "o_w": "self_attn.out_proj.weight", "o_b": "self_attn.out_proj.bias",
    "ln2_w": "final_layer_norm.weight", "ln2_b": "final_layer_norm.bias",
    "fc1_w": "fc1.weight", "fc1_b": "fc1.bias",
    "fc2_w": "fc2.weight", "fc2_b": "fc2.bias",
}
PROJECTOR_TENSORS = {
    "proj1_w": "linear_1.weight", "proj1_b": "linear_1.bias",
    "proj2_w": "linear_2.weight", "proj2_b": "linear_2.bias",
}
# The original release keeps its projector inside the audio tower, under other names.
PROJECTOR_IN_TOWER = {"proj1_w": "proj1.weight", "proj1_b": "proj1.bias",
                      "proj2_w": "proj2.weight", "proj2_b": "proj2.bias"}


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """(length, channels): sin of each timescale, then cos (Whisper's table)."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _layer_norm(x, w, b, eps=1e-5):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch's default (erf) GELU


def _linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def _conv(x, w, b):
    """(N, C, H, W) → stride-2, padding-1 3x3 convolution → GELU."""
    y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return _gelu(y + b[None, :, None, None])


def chunk_valid_tokens(cfg: AudioEncoderConfig, valid_frames: jax.Array) -> jax.Array:
    """(..., chunks) real mel frames per chunk → real encoder tokens per chunk."""
    n = valid_frames
    for _ in range(3):
        n = jnp.where(n > 0, (n - 1) // 2 + 1, 0)
    return n


def encode_windows(cfg: AudioEncoderConfig, params: Params, windows: jax.Array,
                   valid_frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A padded batch of windows → (projected tokens (W, T, output_dim), valid (W, T)).

    ``windows`` (W, mels, r * chunk_frames) with r = chunks_per_window; ``valid_frames``
    (W,) int32 real frames per window (a clip's frames run from each window's start, so
    a window's real frames are a prefix). T = r * tokens_per_chunk.
    """
    W, mels, _ = windows.shape
    r, cf, tpc = cfg.chunks_per_window, cfg.chunk_frames, cfg.tokens_per_chunk
    dtype = params["conv_out"].dtype
    chunks = windows.reshape(W, mels, r, cf).transpose(0, 2, 1, 3).reshape(W * r, 1, mels, cf)
    x = _conv(chunks.astype(dtype), params["conv1_w"], params["conv1_b"])
    x = _conv(x, params["conv2_w"], params["conv2_b"])
    x = _conv(x, params["conv3_w"], params["conv3_b"])
    n, c, f, t = x.shape  # t == tokens_per_chunk
    x = _linear(x.transpose(0, 3, 1, 2).reshape(n, t, c * f), params["conv_out"])
    x = x + params["positions"][:t].astype(dtype)
    # Real frames per chunk of each window → real tokens per chunk → a (W, T) mask.
    starts = jnp.arange(r, dtype=jnp.int32) * cf
    per_chunk = jnp.clip(valid_frames[:, None] - starts[None, :], 0, cf)
    tokens = chunk_valid_tokens(cfg, per_chunk)  # (W, r)
    valid = (jnp.arange(tpc)[None, None, :] < tokens[:, :, None]).reshape(W, r * tpc)
    h = x.reshape(W, r * tpc, -1)
    # Padding keys get a large finite negative, not -inf: a window of padding only then
    # averages garbage instead of making NaNs (its outputs are dropped either way).
    bias = jnp.where(valid, 0.0, -1e30)[:, None, None, :]

    def layer(h, w):
        return _encoder_layer(cfg, w, h, bias), None

    h, _ = jax.lax.scan(layer, h, params["layers"])
    h = _layer_norm(h, params["ln_post_w"], params["ln_post_b"])
    h = _gelu(_linear(h, params["proj1_w"], params["proj1_b"]))
    h = _linear(h, params["proj2_w"], params["proj2_b"])
    return h, valid


def _encoder_layer(cfg: AudioEncoderConfig, w: Params, h: jax.Array, bias: jax.Array):
    """Pre-norm self-attention (within each window) and GELU MLP, both residual."""
    W, T, D = h.shape
    heads = cfg.num_heads
    x = _layer_norm(h, w["ln1_w"], w["ln1_b"])
    split = lambda y: y.reshape(W, T, heads, D // heads).transpose(0, 2, 1, 3)  # noqa: E731
    q = split(_linear(x, w["q_w"], w["q_b"]))
    k = split(_linear(x, w["k_w"], w["k_b"]))
    v = split(_linear(x, w["v_w"], w["v_b"]))
    scores = jnp.einsum("whqd,whkd->whqk", q, k).astype(jnp.float32) * (D // heads) ** -0.5
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(h.dtype)
    attn = jnp.einsum("whqk,whkd->whqd", probs, v).transpose(0, 2, 1, 3).reshape(W, T, D)
    h = h + _linear(attn, w["o_w"], w["o_b"])
    x = _layer_norm(h, w["ln2_w"], w["ln2_b"])
    return h + _linear(_gelu(_linear(x, w["fc1_w"], w["fc1_b"])), w["fc2_w"], w["fc2_b"])


def params_from_tensors(cfg: AudioEncoderConfig, get, prefix: str, projector_prefix: str | None,
                        dtype=np.float32) -> dict:
    """Host params pytree from stored tensors: ``get(name)`` → numpy array. Layer tensors
    are stacked on a leading layer axis (the encoder scans them)."""
    cast = lambda a: np.asarray(a).astype(dtype, copy=False)  # noqa: E731
    params = {k: cast(get(prefix + v)) for k, v in TOP_TENSORS.items()}
    if projector_prefix is None:  # original release: the projector lives in the tower
        params.update({k: cast(get(prefix + v)) for k, v in PROJECTOR_IN_TOWER.items()})
    else:
        params.update({k: cast(get(projector_prefix + v)) for k, v in PROJECTOR_TENSORS.items()})
    params["layers"] = {
        k: np.stack([cast(get(f"{prefix}layers.{i}.{v}")) for i in range(cfg.num_layers)])
        for k, v in LAYER_TENSORS.items()}
    params["positions"] = sinusoid_positions(cfg.max_position_embeddings, cfg.d_model)
    return params
