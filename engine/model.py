"""The decoder: one Flax NNX module for Qwen3, Qwen2, Llama and their MoE forms, and
its forward step.

Layer weights are stacked on a leading layer axis and run with ``lax.scan``,
so compile time does not grow with depth. In MoE models the MLP weights of dense
and sparse layers stack separately (each over its own layers, so no layer holds
weights of both kinds); the layers run in order as one scan per run of consecutive
layers of one kind (``ModelConfig.layer_runs``): one scan for the usual
every-layer-sparse model, a few where ``mlp_only_layers`` interleave dense layers.
Every parameter carries the names of the mesh axes it is split over (``"tp"``; expert
weights also ``"ep"``), even when the mesh has one device, so tensor and expert
parallelism are a matter of the mesh, not of the model (engine/mesh.py).

How the weights reach the matmuls (stacked or per layer, fused, XLA's dots or a
C++ kernel) is engine/weight_forms.py; this file is what the model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sgljax.engine.batch import StepBatch
from sgljax.engine.config import ModelConfig, rope_inv_freq
from sgljax.engine.mesh import TP
from sgljax.engine.layers import apply_rope, rms_norm, rms_norm_features, rope_cos_sin
from sgljax.engine.moe import EXPERT_SPECS, EXPERT_TENSORS, sparse_mlp
from sgljax.engine.weights import DENSE_MLP_TENSORS, MOE_TENSORS, SHARED_EXPERT_TENSORS
from sgljax.engine.weight_forms import LinearKernel, Matmuls, Weights, dense, step_matmuls
from sgljax.kernels.paged_attention import ragged_paged_attention, write_kv



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
        dense_layers, moe_layers = cfg.num_dense_layers, cfg.num_moe_layers
        if dense_layers:  # stacked over the dense layers only
            self.gate_proj = p((dense_layers, f, d), (None, TP, None))
            self.up_proj = p((dense_layers, f, d), (None, TP, None))
            self.down_proj = p((dense_layers, d, f), (None, None, TP))
        if moe_layers:  # (L_moe, E, out, in): experts over ep, matmul dims over tp (moe.py)
            E, fm, fs = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
            self.router = p((moe_layers, E, d), (None, None, None))
            self.expert_gate_proj = p((moe_layers, E, fm, d), EXPERT_SPECS["expert_gate_proj"])
            self.expert_up_proj = p((moe_layers, E, fm, d), EXPERT_SPECS["expert_up_proj"])
            self.expert_down_proj = p((moe_layers, E, d, fm), EXPERT_SPECS["expert_down_proj"])
            if fs:
                self.shared_gate_proj = p((moe_layers, fs, d), (None, TP, None))
                self.shared_up_proj = p((moe_layers, fs, d), (None, TP, None))
                self.shared_down_proj = p((moe_layers, d, fs), (None, None, TP))
                self.shared_expert_gate = p((moe_layers, 1, d), (None, None, None))


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

    def weights(self) -> tuple[Weights, Weights]:
        """(top-level weights, stacked layer weights), as plain arrays for ``forward``."""
        top = {"embed": self.embed[...], "final_norm": self.final_norm[...],
               "inv_freq": self.inv_freq[...]}
        if not self.cfg.tie_word_embeddings:
            top["lm_head"] = self.lm_head[...]
        layers = {name: var[...] for name, var in vars(self.layers).items()
                  if isinstance(var, nnx.Param)}
        return top, layers


class StepContext(NamedTuple):
    """What every layer of one step shares."""
    cfg: ModelConfig
    kv_heads: int  # may exceed cfg's: replicated for tensor parallelism
    batch: StepBatch
    cos: jax.Array  # RoPE tables for batch.positions
    sin: jax.Array
    attention: Callable  # ragged_paged_attention or a kernel with its signature
    write_kv: Callable  # write_kv or a kernel with its signature
    mm: Matmuls  # w[layer] @ x for the layer's projections
    moe_backend: str = "grouped"  # engine/moe.py: dense | grouped
    experts: Weights | None = None  # every sparse layer's expert weights, whole (engine/moe.py)


def embed(top: Weights, tokens: jax.Array, dtype) -> jax.Array:
    """(T,) token ids → feature-major activations (D, T): see engine/layers.py."""
    return top["embed"][tokens].T.astype(dtype)


def _heads(ctx: StepContext, x: jax.Array, bias: jax.Array | None, count: int) -> jax.Array:
    """(count * head_dim, T) projection (+ bias) → token-major (T, count, head_dim)."""
    if bias is not None:
        x = x + bias[:, None]
    return x.T.reshape(x.shape[1], count, ctx.cfg.head_dim)


def attention_block(ctx: StepContext, w: Weights, layer: jax.Array, h: jax.Array,
                    k_cache: jax.Array, v_cache: jax.Array):
    """h + attention of its norm. Returns (h, k_cache, v_cache)."""
    x = rms_norm_features(h, w["input_norm"], ctx.cfg.rms_norm_eps)
    out, k_cache, v_cache = attend(ctx, w, layer, x, k_cache, v_cache)
    return h + out, k_cache, v_cache


def attend(ctx: StepContext, w: Weights, layer: jax.Array, x: jax.Array,
           k_cache: jax.Array, v_cache: jax.Array):
    """o_proj(ragged paged attention of x's q over the cache, after writing x's k/v into
    it), feature-major (D, T). Returns (that, k_cache, v_cache)."""
    cfg, batch = ctx.cfg, ctx.batch
    hd, nh, kvh = cfg.head_dim, cfg.num_heads, ctx.kv_heads
    bias = (lambda name: w[name]) if cfg.qkv_bias else (lambda name: None)
    q, k, v = ctx.mm.group(w, layer, x, ("q_proj", "k_proj", "v_proj"),
                           (nh * hd, kvh * hd, kvh * hd))
    q = _heads(ctx, q, bias("q_bias"), nh)
    k = _heads(ctx, k, bias("k_bias"), kvh)
    v = _heads(ctx, v, bias("v_bias"), kvh)
    if cfg.qk_norm:  # Qwen3
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    k_cache, v_cache = ctx.write_kv(k_cache, v_cache, layer, batch.slots, k, v)
    attn = ctx.attention(q, k_cache, v_cache, layer, batch.page_table, batch.cu_q_lens,
                         batch.kv_lens, batch.num_seqs, tree_bits=batch.tree_bits)
    return ctx.mm(w, "o_proj", layer, attn.reshape(x.shape[1], nh * hd).T), k_cache, v_cache


def mlp_block(ctx: StepContext, w: Weights, layer: jax.Array, h: jax.Array) -> jax.Array:
    """h + the SwiGLU MLP of its norm: down(silu(gate x) * up x)."""
    cfg = ctx.cfg
    x = rms_norm_features(h, w["post_attn_norm"], cfg.rms_norm_eps)
    gate, up = ctx.mm.group(w, layer, x, ("gate_proj", "up_proj"), (cfg.intermediate_size,) * 2)
    gated = jax.nn.silu(gate) * up
    return h + ctx.mm(w, "down_proj", layer, gated)


def sparse_mlp_block(ctx: StepContext, w: Weights, h: jax.Array) -> jax.Array:
    """h + the MoE block of its norm (engine/moe.py), on token-major activations."""
    cfg = ctx.cfg
    x = rms_norm_features(h, w["post_attn_norm"], cfg.rms_norm_eps)
    return h + sparse_mlp(cfg, {**w, **ctx.experts}, x.T, ctx.moe_backend).T


def decoder_layer(ctx: StepContext, carry, xs, sparse: bool = False):
    """One layer, as a ``lax.scan`` body: carry (h, k_cache, v_cache), xs (weights, layer id).
    ``sparse`` (static): an MoE layer."""
    h, k_cache, v_cache = carry
    w, layer = xs
    h, k_cache, v_cache = attention_block(ctx, w, layer, h, k_cache, v_cache)
    h = sparse_mlp_block(ctx, w, h) if sparse else mlp_block(ctx, w, layer, h)
    return (h, k_cache, v_cache), None


# The MLP weights of each kind of layer (sparse: True), each stacked over that kind only.
_MLP_TENSORS = {False: set(DENSE_MLP_TENSORS),
                True: set(MOE_TENSORS) | set(SHARED_EXPERT_TENSORS)}


def _run_weights(layers: Weights, sparse: bool, first: int, count: int, kind_first: int) -> Weights:
    """One run's slice of the stacked weights: attention ones by model layer, MLP ones by
    the layer's place in its kind's stack. A run over a whole stack takes it as it is
    (dense models, every-layer-sparse ones); shorter runs slice it."""
    out = {"moe_layer": jnp.arange(kind_first, kind_first + count)} if sparse else {}
    for name, w in layers.items():
        if name in _MLP_TENSORS[not sparse] or name in EXPERT_TENSORS:  # experts: StepContext
            continue
        start = kind_first if name in _MLP_TENSORS[sparse] else first
        out[name] = w if (start, count) == (0, w.shape[0]) else w[start:start + count]
    return out


def _keep_inputs(aux: jax.Array, h: jax.Array, layer: jax.Array,
                 capture: tuple[int, ...]) -> jax.Array:
    """aux (C, D, T): slot c takes h, the input of layer ``capture[c]``, when this is it."""
    hit = jnp.asarray(capture, jnp.int32) == layer
    return jnp.where(hit[:, None, None], h[None], aux)


def run_layers(ctx: StepContext, layers: Weights | list[Weights], layer_ids: jax.Array,
               carry, capture: tuple[int, ...] = ()):
    """Every layer over carry (h, k_cache, v_cache): scanned over stacked weights (one
    scan per run of dense or sparse layers), unrolled over a list of per-layer ones.
    With ``capture`` the carry has a fourth part, (C, D, T): the inputs of those layers."""
    def layer_step(carry, xs, sparse=False):
        if not capture:
            return decoder_layer(ctx, carry, xs, sparse)
        *state, aux = carry
        aux = _keep_inputs(aux, state[0], xs[1], capture)
        state, _ = decoder_layer(ctx, tuple(state), xs, sparse)
        return (*state, aux), None

    if isinstance(layers, dict):
        ctx = ctx._replace(experts={name: layers[name] for name in EXPERT_TENSORS
                                    if name in layers})
        for sparse, first, count, kind_first in ctx.cfg.layer_runs():
            step = lambda carry, xs, sparse=sparse: layer_step(carry, xs, sparse)  # noqa: E731
            xs = (_run_weights(layers, sparse, first, count, kind_first),
                  layer_ids[first:first + count] if ctx.cfg.is_moe else layer_ids)
            carry, _ = jax.lax.scan(step, carry, xs)
    else:  # per-layer weights: dense models only (the model runner keeps none for MoE)
        for i, w in enumerate(layers):
            carry, _ = layer_step(carry, (w, layer_ids[i]))
    return carry


def lm_head(cfg: ModelConfig, top: Weights, x: jax.Array,
            linear_kernel: LinearKernel | None) -> jax.Array:
    """Feature-major (D, S) → float32 logits (S, V); tied to the embedding or not."""
    head = top["embed"] if cfg.tie_word_embeddings else top["lm_head"]  # (V, D)
    if linear_kernel and linear_kernel.takes_head(x.shape[1]):
        return linear_kernel.fn(head[None], jnp.int32(0), x).T  # as a one-layer stack
    return dense(head, x).astype(jnp.float32).T


def forward(cfg: ModelConfig, kv_heads: int, top: Weights,
            layers: Weights | list[Weights], batch: StepBatch,
            k_cache: jax.Array, v_cache: jax.Array,
            layer_ids: jax.Array | None = None,
            attention_kernel=None, linear_kernel: LinearKernel | None = None,
            act_dtype=None, moe_backend: str = "grouped", kv_writer=None,
            capture: tuple[int, ...] | None = None) -> tuple[jax.Array, ...]:
    """One ragged step. Returns (each sequence's last-token logits (S, V), k_cache, v_cache),
    and with ``capture`` (EAGLE's draft heads read them, engine/eagle_draft.py) a fourth:
    every token's features (T, F). ``capture=()``: the final-normed hidden state
    (EAGLE); layer ids: their inputs side by side, id L meaning the last layer's output
    (EAGLE3's low, middle and high features).

    embed → every layer (``attention_block``, ``mlp_block``) → final norm of the
    tokens we sample from → LM head.

    ``layers`` is either the stacked weights (a leading (L,) axis each), run with
    ``lax.scan`` (compile time does not grow with depth), or one dict per layer
    (``unstack_layers``), run unrolled. On XLA CPU a scan copies each layer's weights
    out of the stacked arrays, where separate arrays are read in place, so the model
    runner unrolls batch-1 decode steps on CPU, and only where a matmul kernel
    (``linear_kernel`` below, which avoids the copy in the scan) is unavailable: from
    batch 2 up, and for prefill, the unrolled step was slower than the scan
    (benchmarks/README.md). Unrolled, ``layer_ids`` (arange(L), passed in as data)
    index the KV cache, so the cache is indexed by data in both forms.

    ``attention_kernel``, when given, replaces ``ragged_paged_attention``, and
    ``kv_writer`` replaces ``write_kv``: the model runner passes the backend's
    (``--attention-backend``: engine/attention_backend.py).
    ``linear_kernel``, when given, computes ``w[layer] @ x`` over the stacked weights
    in the steps it takes (``LinearKernel.takes``), reading the layer's slice in
    place so the scan copies no weights: float32 decode steps on AVX-512
    (kernels/cpu_linear.py), every bfloat16 step on AMX (kernels/cpu_amx_linear.py).
    Weights may come fused (``fuse_projections``): q/k/v and gate/up as one matmul each.

    Activations are in ``act_dtype`` (default: the weights'; the KV cache may hold
    another, written rounded and read back widened). Weights stored in another dtype
    (bfloat16 weights on CPU, where activations stay float32) meet the activations
    in the weights' dtype at each matmul, products summed in the activations'
    (``dense``): the numerics of llama.cpp's BF16 models, and of the AMX kernel.

    ``moe_backend`` (MoE models): how sparse layers compute their experts, dense or
    grouped (engine/moe.py).
    """
    dtype = act_dtype or top["embed"].dtype
    h = embed(top, batch.tokens, dtype)  # (D, T)
    if batch.embeds is not None:  # audio prompts: encoder outputs at the placeholders
        h = jnp.where(batch.embed_mask[None, :], batch.embeds.T.astype(dtype), h)
    cos, sin = rope_cos_sin(batch.positions, top["inv_freq"], dtype)
    layers, mm = step_matmuls(layers, linear_kernel, batch.tokens.shape[0])
    ctx = StepContext(cfg, kv_heads, batch, cos, sin, attention_kernel or ragged_paged_attention,
                      kv_writer or write_kv, mm, moe_backend)
    if layer_ids is None:
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    inner = tuple(i for i in capture or () if i < cfg.num_layers)
    carry = (h, k_cache, v_cache)
    if inner:
        carry += (jnp.zeros((len(inner), *h.shape), h.dtype),)
    carry = run_layers(ctx, layers, layer_ids, carry, inner)
    h, k_cache, v_cache = carry[:3]
    last = h[:, batch.last_index.reshape(-1)]  # (D, S) or (D, S * (k + 1)): the sampled tokens
    last = rms_norm_features(last, top["final_norm"], cfg.rms_norm_eps)
    logits = lm_head(cfg, top, last, linear_kernel)
    if capture is None:
        return logits, k_cache, v_cache
    if not capture:
        features = rms_norm_features(h, top["final_norm"], cfg.rms_norm_eps)
    else:
        kept = dict(zip(inner, carry[3])) if inner else {}
        features = jnp.concatenate([kept[i] if i in kept else h for i in capture], axis=0)
    return logits, k_cache, v_cache, features.T
