"""The decoder: one Flax NNX module for Qwen3, Qwen2 and Llama.

Layer weights are stacked on a leading layer axis and run with ``lax.scan``,
so compile time does not grow with depth. Every parameter carries the names
of the mesh axes it is split over (``"tp"``), even when the mesh has one
device, so tensor parallelism is a matter of the mesh, not of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from sgljax.engine.batch import StepBatch
from sgljax.engine.config import ModelConfig, rope_inv_freq
from sgljax.engine.layers import apply_rope, rms_norm, rms_norm_features, rope_cos_sin
from sgljax.kernels.paged_attention import paged_attention, write_kv

TP = "tp"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections that read the same input, and the name of their rows stacked as one weight.
FUSIBLE = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def fuse_projections(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Stacked layer weights with q/k/v and gate/up each as one (L, sum of N, K) weight.

    One matmul kernel call per group reads the input once and fills the tile unit
    longer (AMX, a 512-token step: q+k+v 0.76 → 0.55 ms a layer, gate+up 1.44 → 1.12)."""
    out = {name: w for name, w in stacked.items()
           if not any(name in group for group in FUSIBLE)}
    for group, fused in FUSIBLE.items():
        out[fused] = jnp.concatenate([stacked[name] for name in group], axis=1)
    return out


def _param(rngs: nnx.Rngs, shape, dtype, sharding, scale=0.02, ones=False):
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)
    return nnx.Param(value, out_sharding=sharding)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked: each has a leading (L,) axis.

    Linear weights are (out, in) as in HF; column-parallel ones split "out",
    row-parallel ones split "in"."""

    def __init__(self, cfg: ModelConfig, kv_heads: int, dtype, rngs: nnx.Rngs):
        L, d, f, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qd, kvd = cfg.num_heads * hd, kv_heads * hd
        p = lambda shape, spec, **kw: _param(rngs, shape, dtype, spec, **kw)  # noqa: E731
        self.input_norm = p((L, d), (None, None), ones=True)
        self.post_attn_norm = p((L, d), (None, None), ones=True)
        self.q_proj = p((L, qd, d), (None, TP, None))
        self.k_proj = p((L, kvd, d), (None, TP, None))
        self.v_proj = p((L, kvd, d), (None, TP, None))
        self.o_proj = p((L, d, qd), (None, None, TP))
        if cfg.qkv_bias:
            self.q_bias = p((L, qd), (None, TP))
            self.k_bias = p((L, kvd), (None, TP))
            self.v_bias = p((L, kvd), (None, TP))
        if cfg.qk_norm:
            self.q_norm = p((L, hd), (None, None), ones=True)
            self.k_norm = p((L, hd), (None, None), ones=True)
        self.gate_proj = p((L, f, d), (None, TP, None))
        self.up_proj = p((L, f, d), (None, TP, None))
        self.down_proj = p((L, d, f), (None, None, TP))


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, kv_heads: int | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.kv_heads = kv_heads or cfg.num_kv_heads  # > cfg's when KV heads are replicated for TP
        self.dtype = dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, (TP, None))
        self.layers = DecoderLayers(cfg, self.kv_heads, dtype, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), dtype, (None,), ones=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, (TP, None))
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(cfg)))

    def weights(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(top-level weights, stacked layer weights), as plain arrays for ``forward``."""
        top = {"embed": self.embed[...], "final_norm": self.final_norm[...],
               "inv_freq": self.inv_freq[...]}
        if not self.cfg.tie_word_embeddings:
            top["lm_head"] = self.lm_head[...]
        layers = {name: var[...] for name, var in vars(self.layers).items()
                  if isinstance(var, nnx.Param)}
        return top, layers

    def __call__(self, batch: StepBatch, k_cache: jax.Array,
                 v_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        top, layers = self.weights()
        return forward(self.cfg, self.kv_heads, top, layers, batch, k_cache, v_cache)


@dataclass(frozen=True)
class LinearKernel:
    """A kernel for ``w[layer] @ x`` over stacked (L, N, K) weights, and where it runs."""
    fn: Callable  # (w (L, N, K), layer () int32, x (K, M)) -> (N, M) float32
    max_tokens: int | None = None  # steps of more tokens use XLA's dots (None: no bound)
    decode_only: bool = False
    head: bool = False  # also the LM head (as a one-layer stack)

    def takes(self, seqs: int, query: int) -> bool:
        if self.decode_only and query != 1:
            return False
        return self.max_tokens is None or seqs * query <= self.max_tokens


def dense(w: jax.Array, x: jax.Array) -> jax.Array:
    """``w @ x`` in x's dtype; weights of another dtype meet x in theirs (see ``forward``)."""
    if w.dtype == x.dtype:
        return w @ x
    return w.astype(x.dtype) @ x.astype(w.dtype).astype(x.dtype)


def unstack_layers(stacked: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
    """Stacked layer weights → one dict of arrays per layer (see ``forward``)."""
    num_layers = next(iter(stacked.values())).shape[0]
    return [{name: w[i] for name, w in stacked.items()} for i in range(num_layers)]


def forward(cfg: ModelConfig, kv_heads: int, top: dict[str, jax.Array],
            layers: dict[str, jax.Array] | list[dict[str, jax.Array]], batch: StepBatch,
            k_cache: jax.Array, v_cache: jax.Array,
            layer_ids: jax.Array | None = None,
            attention_kernel=None, linear_kernel: LinearKernel | None = None,
            act_dtype=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step over a padded batch. Returns (last-token logits (S, V), k_cache, v_cache).

    ``layers`` is either the stacked weights (a leading (L,) axis each), run with
    ``lax.scan`` (compile time does not grow with depth), or one dict per layer, run
    unrolled. On XLA CPU a scan copies each layer's weights out of the stacked arrays
    (a dynamic slice gets its own buffer), where separate arrays are read in place: the
    dense path of a batch-1 SmolLM2 decode takes 42 ms scanned and 29 ms unrolled. The
    model runner uses the unrolled form for batch-1 decode steps on CPU only, and only
    where a matmul kernel (``linear_kernel`` below, which avoids the copy in the scan)
    is unavailable: from batch 2 up, and for prefill, the whole unrolled step measured
    slower than the scan.
    Unrolled, ``layer_ids`` (arange(L), passed in as data) index the KV cache, so the
    cache is indexed by data in both forms.

    ``attention_kernel``, when given, replaces ``paged_attention``: the model runner
    passes the CPU kernel (kernels/cpu_paged_attention.py) where it runs.
    ``linear_kernel``, when given, computes ``w[layer] @ x`` over the stacked weights
    in the steps it takes (``LinearKernel.takes``), reading the layer's slice in
    place so the scan copies no weights: float32 decode steps on AVX-512
    (kernels/cpu_linear.py), every bfloat16 step on AMX (kernels/cpu_amx_linear.py).

    Activations are in ``act_dtype`` (default: the weights'; the KV cache may hold
    another, written rounded and read back widened). Weights stored in another dtype
    (bfloat16 weights on CPU, where activations stay float32) meet the activations
    in the weights' dtype at each matmul, products summed in the activations': the
    numerics of llama.cpp's BF16 models, and of the AMX kernel.
    """
    dtype = act_dtype or top["embed"].dtype
    s, qn = batch.tokens.shape
    n = s * qn
    # Activations are feature-major, (features, tokens): see engine/layers.py.
    h = top["embed"][batch.tokens.reshape(n)].T.astype(dtype)  # (D, N)
    cos, sin = rope_cos_sin(batch.positions, top["inv_freq"], dtype)
    hd, nh, kvh = cfg.head_dim, cfg.num_heads, kv_heads
    attention = attention_kernel or paged_attention
    if linear_kernel and linear_kernel.takes(s, qn) and isinstance(layers, dict):
        # The projections stay whole, closed over; the scan slices only norms and biases.
        whole = {name: w for name, w in layers.items() if name.endswith("_proj")}
        layers = {name: w for name, w in layers.items() if name not in whole}
        mm = lambda w, name, layer, x: linear_kernel.fn(whole[name], layer, x)  # noqa: E731
        has = whole.__contains__
    else:
        mm = lambda w, name, layer, x: dense(w[name], x)  # noqa: E731
        has = (layers if isinstance(layers, dict) else layers[0]).__contains__

    def project(w, layer, x, group, rows):
        """mm of each projection in ``group`` (of ``rows`` output rows each) on x: one
        call on their fused weight where the runner made one (``fuse_projections``)."""
        fused = FUSIBLE[group]
        if not has(fused):
            return [mm(w, name, layer, x) for name in group]
        y = mm(w, fused, layer, x)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        return [y[a:a + r] for a, r in zip(starts, rows)]

    def heads(x, bias, count):  # (count * hd, N) → token-major (S, Q, count, hd)
        if bias is not None:
            x = x + bias[:, None]
        return x.T.reshape(s, qn, count, hd)

    def layer_step(carry, xs):
        h, k_cache, v_cache = carry
        w, layer = xs
        x = rms_norm_features(h, w["input_norm"], cfg.rms_norm_eps)
        bias = (lambda name: w[name]) if cfg.qkv_bias else (lambda name: None)
        q, k, v = project(w, layer, x, ("q_proj", "k_proj", "v_proj"),
                          (nh * hd, kvh * hd, kvh * hd))
        q = heads(q, bias("q_bias"), nh)
        k = heads(k, bias("k_bias"), kvh)
        v = heads(v, bias("v_bias"), kvh)
        if cfg.qk_norm:
            q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = write_kv(k_cache, v_cache, layer, batch.slots, k, v)
        attn = attention(q, k_cache, v_cache, layer, batch.page_table, batch.positions,
                         batch.kv_lens)
        h = h + mm(w, "o_proj", layer, attn.reshape(n, nh * hd).T)
        x = rms_norm_features(h, w["post_attn_norm"], cfg.rms_norm_eps)
        gate, up = project(w, layer, x, ("gate_proj", "up_proj"), (cfg.intermediate_size,) * 2)
        gated = jax.nn.silu(gate) * up
        h = h + mm(w, "down_proj", layer, gated)  # SwiGLU MLP
        return (h, k_cache, v_cache), None

    carry = (h, k_cache, v_cache)
    if layer_ids is None:
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    if isinstance(layers, dict):
        carry, _ = jax.lax.scan(layer_step, carry, (layers, layer_ids))
    else:
        for i, w in enumerate(layers):
            carry, _ = layer_step(carry, (w, layer_ids[i]))
    h, k_cache, v_cache = carry
    last = h[:, jnp.arange(s) * qn + batch.last_index]  # (D, S): only the tokens we sample from
    last = rms_norm_features(last, top["final_norm"], cfg.rms_norm_eps)
    head = top["embed"] if cfg.tie_word_embeddings else top["lm_head"]  # (V, D)
    if linear_kernel and linear_kernel.head:
        logits = linear_kernel.fn(head[None], jnp.int32(0), last).T  # (S, V)
    else:
        logits = dense(head, last).astype(jnp.float32).T  # (S, V)
    return logits, k_cache, v_cache
