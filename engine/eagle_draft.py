"""EAGLE drafting on the device: after each step the draft head (engine/eagle_head.py)
runs over the step's tokens and proposes every sequence's next drafts.

The head keeps K/V caches of its own, paged like the target's and indexed by the
same page table and slots, so the scheduler's pages, the radix cache and preemption
hold for it unchanged. One call per step (``EagleDrafter.dispatch``, right after the
target's step, whose outputs it reads on the device):

1. Extend. Every token of the step goes through the head again: row r reads the
   token after it and the target's features at r, at r's position, and writes the
   head's K/V at r's slot. The token after a row is the next one of its chunk,
   except at the row a sequence samples from (its last kept draft), where it is the
   token the step emitted, and at the end of a prompt chunk that stops short of the
   prompt, where the host supplies the next prompt token (``StepBatch.chunk_next``).
   Rows past the kept drafts write K/V the next step overwrites before anyone reads it.
2. Draft. The head's output at each sequence's sampling row gives draft 1; k - 1
   more passes of one token a sequence give drafts 2..k, each writing its K/V one
   position further (the scheduler holds pages for them: ``draft_lookahead``;
   positions past a sequence's pages write to page 0, which nobody owns).

With ``--speculative-eagle-topk`` above 1, step 2 is a beam search that drafts a token
tree instead (engine/eagle_tree.py), and after a tree step the extend pass reads the
kept branch as a chain (``kept_path_view``).

Drafts are the head's argmax (or top-k): one token for certain, so the target's
rejection sampling (engine/speculative.py) keeps the target's distribution, and greedy
output is the target's whatever the head proposes.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sgljax.engine.attention_backend import AttentionKernels
from sgljax.engine.batch import StepBatch
from sgljax.engine.config import rope_inv_freq
from sgljax.engine.eagle_head import EagleHead, EagleHeadConfig
from sgljax.engine.eagle_tree import draft_tree, slots_at
from sgljax.engine.kv_cache import KVCacheSpec
from sgljax.engine.layers import rms_norm_features, rope_cos_sin
from sgljax.engine.mesh import global_array
from sgljax.engine.model import StepContext, attend, lm_head, mlp_block
from sgljax.engine.weight_forms import LinearKernel, Matmuls, dense
from sgljax.kernels.paged_attention import ragged_paged_attention, write_kv


def head_kv_spec(cfg: EagleHeadConfig, target: KVCacheSpec) -> KVCacheSpec:
    """The head's caches: the target's pages, the head's layers and heads."""
    layer = cfg.layer
    return KVCacheSpec(cfg.num_layers, target.num_pages, target.page_size,
                       layer.num_kv_heads, layer.head_dim, target.dtype)


def _matmul(linear: LinearKernel | None, w: jax.Array, x: jax.Array) -> jax.Array:
    """w @ x, on the C++ matmul kernel where it takes x's columns (one CPU device)."""
    if linear is not None and linear.takes(x.shape[1]):
        return linear.fn(w[None], jnp.int32(0), x).astype(x.dtype)
    return dense(w, x)


def head_pass(cfg: EagleHeadConfig, kernels, linear: LinearKernel | None, dtype, head: dict,
              target_top: dict, tokens: jax.Array, hidden: jax.Array, batch: StepBatch,
              k_cache: jax.Array, v_cache: jax.Array, project: bool):
    """The head over ``batch``'s tokens: (its output h (D, T), k_cache, v_cache).

    ``hidden`` (F, T) feature-major: the target's features (``project``: EAGLE3 maps
    them through fc first) or the head's own output of the step before."""
    layer_cfg = cfg.layer
    top, layers = head["top"], head["layers"]
    table = top["embed"] if "embed" in top else target_top["embed"]
    e = table[tokens].T.astype(dtype)
    cos, sin = rope_cos_sin(batch.positions, top["inv_freq"], dtype)
    names = frozenset(layers[0])
    mm = (Matmuls(names, linear.fn, head["whole"])  # the layers' projections, stacked
          if linear is not None and linear.takes(tokens.shape[0]) else Matmuls(names))
    ctx = StepContext(layer_cfg, layer_cfg.num_kv_heads, batch, cos, sin, kernels.attention,
                      kernels.write_kv, mm)
    eps = layer_cfg.rms_norm_eps
    if cfg.kind == "EAGLE3":
        w, at = layers[0], jnp.int32(0)
        if project:
            hidden = _matmul(linear, top["fc"], hidden.astype(dtype))
        x = jnp.concatenate([rms_norm_features(e, w["input_norm"], eps),
                             rms_norm_features(hidden, w["hidden_norm"], eps)], axis=0)
        out, k_cache, v_cache = attend(ctx, w, at, x, k_cache, v_cache)
        return mlp_block(ctx, w, at, hidden + out), k_cache, v_cache
    h = _matmul(linear, top["fc"], jnp.concatenate([e, hidden.astype(dtype)], axis=0))
    if "fc_bias" in top:
        h = h + top["fc_bias"][:, None]
    for i, w in enumerate(layers):
        x = h if i == 0 else rms_norm_features(h, w["input_norm"], eps)  # layer 0: no norm
        out, k_cache, v_cache = attend(ctx, w, jnp.int32(i), x, k_cache, v_cache)
        h = mlp_block(ctx, w, jnp.int32(i), h + out)
    return h, k_cache, v_cache


def head_logits(cfg: EagleHeadConfig, target_cfg, linear: LinearKernel | None, head: dict,
                target_top: dict, h: jax.Array):
    """The head's logits (N, V') from its outputs (D, N), and the target's token id of
    each of its V' (None: the target's vocabulary itself)."""
    top = head["top"]
    if cfg.kind == "EAGLE3":
        x = rms_norm_features(h, top["norm"], cfg.layer.rms_norm_eps)
        return _matmul(linear, top["lm_head"], x).T.astype(jnp.float32), top["hot"]
    return lm_head(target_cfg, target_top, h, linear), None


def head_tokens(cfg: EagleHeadConfig, target_cfg, linear: LinearKernel | None, head: dict,
                target_top: dict, h: jax.Array) -> jax.Array:
    """The head's argmax token ids (in the target's vocabulary) from its outputs (D, S)."""
    logits, ids = head_logits(cfg, target_cfg, linear, head, target_top, h)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return best if ids is None else ids[best]


def kept_path_view(batch: StepBatch, features: jax.Array, path: jax.Array,
                   accepted: jax.Array):
    """A tree step seen as a chain: each verify row's kept nodes in depth order (their
    tokens, features and positions at the row's first slots; the rest as they were), and
    causal attention."""
    T, S = batch.tokens.shape[0], path.shape[0]
    depth = jnp.arange(path.shape[1])[None, :]
    row0 = batch.cu_q_lens[:S, None]
    keep = (depth <= accepted[:, None]) & (jnp.arange(S) < batch.num_seqs)[:, None]
    take = jnp.arange(T).at[jnp.where(keep, row0 + depth, T)].set(row0 + path, mode="drop")
    view = dataclasses.replace(batch, tokens=batch.tokens[take], positions=batch.positions[take],
                               tree_bits=jnp.full((T,), -1, jnp.int32))
    return view, features[take]


def propose(cfg: EagleHeadConfig, target_cfg, num_steps: int, topk: int, num_nodes: int,
            page_size: int, kernels, linear: LinearKernel | None, dtype, head: dict,
            target_top: dict, k_cache: jax.Array, v_cache: jax.Array, kept: jax.Array,
            features: jax.Array, batch: StepBatch, emitted: jax.Array, accepted: jax.Array,
            path: jax.Array):
    """features (T, F): the target's, of every token of the step; emitted, path (S, R) and
    accepted (S,): what the step's verify returned. → (proposal (S, 2, num_nodes): the
    drafts and their parents, ``kept`` (rows, 2, num_nodes) with the proposal in its first
    rows (the next step reads it there: engine/spec_overlap.py), k_cache, v_cache)."""
    proposal, k_cache, v_cache = _propose(
        cfg, target_cfg, num_steps, topk, num_nodes, page_size, kernels, linear, dtype, head,
        target_top, k_cache, v_cache, features, batch, emitted, accepted, path)
    return proposal, jax.lax.dynamic_update_slice(kept, proposal, (0, 0, 0)), k_cache, v_cache


def _propose(cfg, target_cfg, num_steps, topk, num_nodes, page_size, kernels, linear, dtype,
             head, target_top, k_cache, v_cache, features, batch, emitted, accepted, path):
    if batch.tree_bits is not None:
        batch, features = kept_path_view(batch, features, path, accepted)
    T, (S, width) = batch.tokens.shape[0], batch.page_table.shape
    rows = jnp.arange(S)
    live = rows < batch.num_seqs
    sampling = live & (batch.chunk_next < 0)
    at = jnp.take_along_axis(batch.last_index.reshape(S, -1), accepted[:, None], axis=1)[:, 0]
    bonus = jnp.take_along_axis(emitted, accepted[:, None], axis=1)[:, 0]
    after = jnp.concatenate([batch.tokens[1:], jnp.zeros((1,), batch.tokens.dtype)])
    after = after.at[jnp.where(live, at, T)].set(
        jnp.where(sampling, bonus, batch.chunk_next), mode="drop")
    h, k_cache, v_cache = head_pass(cfg, kernels, linear, dtype, head, target_top, after,
                                    features.T, batch, k_cache, v_cache, project=True)
    hidden = h[:, at]
    start = batch.positions[at]  # the sampling row's position; draft i goes at start + i
    if topk > 1:
        def run(tokens, hidden, step, k_cache, v_cache):
            return head_pass(cfg, kernels, linear, dtype, head, target_top, tokens, hidden,
                             step, k_cache, v_cache, project=False)

        drafts, parents, k_cache, v_cache = draft_tree(
            run, lambda h: head_logits(cfg, target_cfg, linear, head, target_top, h), hidden,
            start, batch, sampling, k_cache, v_cache, steps=num_steps, k=topk,
            num_nodes=num_nodes, page_size=page_size)
        return jnp.stack([drafts, parents], axis=1), k_cache, v_cache
    first = head_tokens(cfg, target_cfg, linear, head, target_top, hidden)

    def one_more(carry, i):
        k_cache, v_cache, token, hidden = carry
        pos = start + i
        step = StepBatch(
            tokens=token, positions=pos,
            slots=slots_at(batch.page_table, pos, sampling, page_size),
            page_table=batch.page_table,
            cu_q_lens=jnp.minimum(jnp.arange(S + 1, dtype=jnp.int32), batch.num_seqs),
            kv_lens=jnp.where(live, jnp.minimum(pos + 1, width * page_size), 0),
            num_seqs=batch.num_seqs, last_index=rows, prev_rows=jnp.full((S,), -1, jnp.int32))
        h, k_cache, v_cache = head_pass(cfg, kernels, linear, dtype, head, target_top, token,
                                        hidden, step, k_cache, v_cache, project=False)
        nxt = head_tokens(cfg, target_cfg, linear, head, target_top, h)
        return (k_cache, v_cache, nxt, h), token

    (k_cache, v_cache, last, _), earlier = jax.lax.scan(
        one_more, (k_cache, v_cache, first, hidden), jnp.arange(1, num_steps, dtype=jnp.int32))
    drafts = jnp.concatenate([earlier.T, last[:, None]], axis=1)
    parents = jnp.broadcast_to(jnp.arange(num_steps, dtype=jnp.int32), drafts.shape)
    return jnp.stack([drafts, parents], axis=1), k_cache, v_cache


class EagleDrafter:
    """The head's weights and caches on the mesh, and its compiled drafting per bucket."""

    def __init__(self, head: EagleHead, target_cfg, target_kv: KVCacheSpec, mesh, kernels,
                 linear: LinearKernel | None, dtype, num_steps: int, compile_fn,
                 topk: int = 1, num_nodes: int | None = None):
        self.cfg, self.mesh, self.num_steps, self.dtype = head.cfg, mesh, num_steps, dtype
        self.num_nodes = num_nodes or num_steps  # drafts a step proposes (a chain: steps)
        # The target's features a step hands over: its hidden state, or three side by side.
        self.feature_size = target_cfg.hidden_size * (len(head.cfg.capture) or 1)
        replicated = NamedSharding(mesh, P())
        place = lambda a: global_array(np.asarray(a), replicated)  # noqa: E731
        top = {**head.top, "inv_freq": rope_inv_freq(head.cfg.layer)}
        self.weights = {"top": {k: place(v) for k, v in top.items()},
                        "layers": [{k: place(v) for k, v in w.items()} for w in head.layers]}
        if linear is not None:  # the kernel reads stacked (L, N, K) projections, by layer
            self.weights["whole"] = {
                name: place(np.stack([w[name] for w in head.layers]))
                for name in head.layers[0] if name.endswith("_proj")}
        self.kv_spec = head_kv_spec(head.cfg, target_kv)
        whole = mesh.devices.size > 1
        if whole:  # the head is small: every device runs all of it (its few KV heads
            # need not divide over tp), with the pure-JAX kernels
            kernels = AttentionKernels("native", ragged_paged_attention, write_kv)
        self.k_cache, self.v_cache = self.kv_spec.allocate(mesh, split_heads=not whole)
        kv = self.k_cache.sharding
        self._fn = jax.jit(partial(propose, head.cfg, target_cfg, num_steps, topk,
                                   self.num_nodes, target_kv.page_size, kernels, linear,
                                   dtype),
                           donate_argnums=(2, 3, 4),
                           out_shardings=(replicated, replicated, kv, kv))
        self._compile = compile_fn  # the model runner's: the persistent cache, counted
        self._executables: dict[tuple, object] = {}
        self.replicated = replicated

    def _executable(self, target_top, kept, features, batch, emitted, accepted, path):
        key = (batch.shape, batch.page_table.shape[1], features.shape, emitted.shape)
        exe = self._executables.get(key)
        if exe is None:
            with jax.set_mesh(self.mesh):
                exe = self._compile(self._fn.lower(self.weights, target_top, self.k_cache,
                                                   self.v_cache, kept, features, batch,
                                                   emitted, accepted, path))
            self._executables[key] = exe
        return exe

    def warm(self, target_top, batch: StepBatch, kept: jax.Array) -> None:
        """Compile (or load) the drafting of ``batch``'s bucket (a packed step's arrays:
        the head reads them as the step hands them over, on the device)."""
        T, S = batch.shape
        R = batch.drafts.shape[1] + 1  # the verify step's nodes a row
        spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self.replicated)  # noqa: E731
        on_device = jax.tree.map(lambda x: spec(np.shape(x), np.asarray(x).dtype), batch)
        self._executable(target_top, kept, spec((T, self.feature_size), self.dtype), on_device,
                         spec((S, R), jnp.int32), spec((S,), jnp.int32), spec((S, R), jnp.int32))

    def dispatch(self, target_top, features, batch: StepBatch, emitted, accepted, path,
                 kept: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Start drafting after the step that returned ``features``, ``emitted``,
        ``accepted``, ``path`` and ``batch`` (as the step ran it); returns the proposal
        (S, 2, k): drafts, parents, and ``kept`` (donated) with it in its first rows."""
        exe = self._executable(target_top, kept, features, batch, emitted, accepted, path)
        proposal, kept, self.k_cache, self.v_cache = exe(
            self.weights, target_top, self.k_cache, self.v_cache, kept, features, batch,
            emitted, accepted, path)
        return proposal, kept
