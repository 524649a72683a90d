"""Speculative decoding's verify step: which draft tokens the target model keeps.

A decode row feeds its last token and k draft tokens in one step (a ragged batch
like any other). The drafts form a tree: node 0 is the row's last token, draft j is
node j, and ``parents[j - 1]`` (< j) is its parent. A chain (NGRAM, a top-1 head)
has parent j - 1; a token tree (EAGLE with top-k > 1) branches, its nodes sit at
position start + depth and see only their ancestors (``tree_bits``,
kernels/paged_attention.py). The logits at node i are the target's distribution p_i
of the token after it. From the root down, a node's children are tested in order:
greedy rows keep the child that is p_i's argmax; sampling rows keep child c with
probability p(c) / (1 - the mass of the siblings tested before it), which is p
with those siblings removed and renormalised. At the first node whose children are
all rejected (or that has none), the row draws from p without them. Drafts are
each one token for certain (NGRAM's lookups, a head's top-k), so this is rejection
sampling (Leviathan et al. 2023, Chen et al. 2023; SpecInfer's multi-candidate
form for trees): every emitted token follows the target's own distribution,
top-k/top-p/min-p filters included. A row emits 1 to depth + 1 tokens a step.

The kept nodes' K/V were written at their node's slot; ``keep_path_kv`` moves them
to the slots of the positions they now hold (a chain's are already there).

Rows with penalties or a grammar get no drafts (their logits depend on every
token before), so their first position samples exactly as a step without
speculation does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch, StepBatch
from sgljax.engine.sampling import choose, report, row_key, target_logits


def node_depths(parents) -> np.ndarray:
    """(n + 1,) depth of node 0..n of a row (host side: its positions)."""
    depth = [0]
    for p in parents:
        depth.append(depth[p] + 1)
    return np.asarray(depth, np.int32)


def verify(logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array, parents: jax.Array,
           sb: SamplingBatch, adjust: LogitAdjust, grammar: GrammarMask):
    """logits (S * R, V): R = k + 1 nodes a row; drafts, parents (S, k); num_drafts (S,).

    Returns tokens (S, R) (row s emits ``tokens[s, :accepted[s] + 1]``), their logprobs
    (S, R), top-20 ids and logprobs (S, R, 20), accepted (S,) drafts kept, and path (S, R)
    the node each kept position came from (the node j at depth j; past ``accepted``, j)."""
    S, K = drafts.shape
    R = K + 1
    node = jnp.arange(R)[None, :]
    token = jnp.concatenate([jnp.zeros((S, 1), drafts.dtype), drafts], axis=1)
    parent = jnp.concatenate([jnp.zeros((S, 1), parents.dtype), parents], axis=1)
    real = (node >= 1) & (node <= num_drafts[:, None])
    depth = tree_depths(parent)
    rows = logits.reshape(S, R, -1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32).reshape(S, R)
    greedy_kept = token == jnp.take_along_axis(greedy, parent, axis=1)
    only_greedy = sb.all_greedy | ~jnp.any(num_drafts > 0)  # no row samples a draft
    kept = jax.lax.cond(only_greedy, lambda: greedy_kept,
                        lambda: _sampled_walk(logits, token, parent, real, depth, sb))
    kept = jnp.where(sb.temperature[:, None] <= 0, greedy_kept, kept) & real
    on = _walk(parent, kept)
    accepted = jnp.sum(on[:, 1:], axis=1).astype(jnp.int32)
    at_depth = on[:, None, :] & (depth[:, None, :] == node[:, :, None])  # (S, depth, node)
    path = jnp.where(node <= accepted[:, None], jnp.argmax(at_depth, axis=2), node)
    path = path.astype(jnp.int32)
    last = jnp.take_along_axis(path, accepted[:, None], axis=1)[:, 0]  # the deepest kept node
    rejected = real & (parent == last[:, None])  # its children: all tested, none kept
    greedy_final = jnp.take_along_axis(greedy, last[:, None], axis=1)[:, 0]
    final = jax.lax.cond(only_greedy, lambda: greedy_final,
                         lambda: _residual_draw(rows, last, accepted, token, rejected, sb))
    final = jnp.where(sb.temperature <= 0, greedy_final, final)
    plain = choose(rows[:, 0], sb, adjust, grammar)  # rows without drafts
    final = jnp.where(num_drafts > 0, final, plain)
    ahead = jnp.take_along_axis(token, path[:, 1:], axis=1)  # the kept drafts, by depth
    tokens = jnp.where(node[:, :K] < accepted[:, None], ahead, final[:, None])
    tokens = jnp.concatenate([tokens, final[:, None]], axis=1)
    # Each emitted token's logprobs are its node's: report at the nodes, then by depth.
    emitted = jnp.where(node <= accepted[:, None], path, R)
    emitted_at_node = jnp.zeros((S, R), jnp.int32).at[jnp.arange(S)[:, None], emitted].set(
        tokens, mode="drop")
    logprobs, top_ids, top_logprobs = report(logits, emitted_at_node.reshape(-1), sb.want_top)
    by_depth = lambda x: jnp.take_along_axis(  # noqa: E731
        x.reshape(S, R, *x.shape[1:]), path.reshape(S, R, *([1] * (x.ndim - 1))), axis=1)
    return (tokens, by_depth(logprobs), by_depth(top_ids), by_depth(top_logprobs), accepted,
            path)


def tree_depths(parent: jax.Array) -> jax.Array:
    """(S, R) depth of each node of rows whose parents are ``parent`` (S, R)."""
    depth = jnp.zeros(parent.shape, jnp.int32)
    for j in range(1, parent.shape[1]):  # parents come first: one pass
        depth = depth.at[:, j].set(jnp.take_along_axis(depth, parent[:, j:j + 1], axis=1)[:, 0] + 1)
    return depth


def _walk(parent: jax.Array, kept: jax.Array) -> jax.Array:
    """(S, R) nodes on the kept path: a node is when it is kept, its parent is, and no
    sibling before it was."""
    S, R = parent.shape
    on = jnp.zeros((S, R), bool).at[:, 0].set(True)
    taken = jnp.zeros((S, R), bool)  # a child of this node is on the path already
    for j in range(1, R):
        p = parent[:, j:j + 1]
        ok = kept[:, j] & jnp.take_along_axis(on, p, axis=1)[:, 0] \
            & ~jnp.take_along_axis(taken, p, axis=1)[:, 0]
        on = on.at[:, j].set(ok)
        taken = taken | ((jnp.arange(R)[None, :] == p) & ok[:, None])
    return on


def _node_params(sb: SamplingBatch, depth: jax.Array) -> SamplingBatch:
    """Each row's sampling parameters on its nodes; node i draws with the key of the
    request's (steps + depth(i))-th token."""
    R = depth.shape[1]
    rep = lambda x: jnp.repeat(x, R)  # noqa: E731
    return dataclasses.replace(
        sb, temperature=rep(sb.temperature), top_k=rep(sb.top_k), top_p=rep(sb.top_p),
        min_p=rep(sb.min_p), seeds=rep(sb.seeds),
        steps=(sb.steps[:, None] + depth).reshape(-1))


def _sampled_walk(logits, token, parent, real, depth, sb):
    """kept (S, R): draft j passes its test, u < p(c) / (1 - mass of earlier siblings),
    under its parent's distribution and a uniform of its parent's key and sibling rank."""
    S, R = token.shape
    pb = _node_params(sb, depth)
    target = target_logits(logits, pb)
    lse = jax.nn.logsumexp(target, axis=-1).reshape(S, R)
    keys = jax.vmap(row_key)(pb.seeds, pb.steps).reshape(S, R)
    flat_parent = (jnp.arange(S)[:, None] * R + parent).reshape(-1)
    parent_logit = target[flat_parent, token.reshape(-1)].reshape(S, R)
    p = jnp.exp(parent_logit - jnp.take_along_axis(lse, parent, axis=1))
    p = jnp.where(real, p, 0.0)
    earlier = (parent[:, None, :] == parent[:, :, None]) \
        & (jnp.arange(R)[None, None, :] < jnp.arange(R)[None, :, None])  # (S, j, i): i before j
    before = jnp.sum(jnp.where(earlier, p[:, None, :], 0.0), axis=2)
    rank = jnp.sum(earlier & real[:, None, :], axis=2)
    parent_keys = jnp.take_along_axis(keys, parent, axis=1)
    u = jax.vmap(jax.vmap(lambda k, r: jax.random.uniform(jax.random.fold_in(k, 1 + r))))(
        parent_keys, rank)
    return u * jnp.maximum(1.0 - before, 0.0) < p


def _residual_draw(rows, last, accepted, token, rejected, sb):
    """The deepest kept node's distribution without its rejected children, drawn with the
    key of that position."""
    S = rows.shape[0]
    pb = dataclasses.replace(sb, steps=sb.steps + accepted)
    at_last = jnp.take_along_axis(rows, last[:, None, None], axis=1)[:, 0]
    target = target_logits(at_last, pb)
    removed = jnp.zeros(target.shape, jnp.int32).at[jnp.arange(S)[:, None], token].max(
        rejected.astype(jnp.int32)) > 0
    without = jnp.where(removed, -jnp.inf, target)
    keys = jax.vmap(row_key)(pb.seeds, pb.steps)
    draw = jax.vmap(jax.random.categorical)(keys, without).astype(jnp.int32)
    # Nothing left but the drafts (they held all the mass, up to rounding): the likeliest.
    return jnp.where(jnp.isfinite(jnp.max(without, axis=-1)), draw,
                     jnp.argmax(target, axis=-1).astype(jnp.int32))


def keep_path_kv(k_cache: jax.Array, v_cache: jax.Array, batch: StepBatch, path: jax.Array,
                 accepted: jax.Array):
    """Move each kept tree node's K/V (every layer) from its node's slot to its depth's."""
    S, R = path.shape
    start = batch.cu_q_lens[:S, None]
    moves = (jnp.arange(R)[None, :] <= accepted[:, None]) & (path != jnp.arange(R)[None, :])
    T = batch.slots.shape[0]
    src = jnp.where(moves, batch.slots[jnp.minimum(start + path, T - 1)], 0).reshape(-1)
    dst = jnp.where(moves, batch.slots[jnp.minimum(start + jnp.arange(R)[None, :], T - 1)],
                    0).reshape(-1)
    ps = k_cache.shape[3]

    def move(cache):
        rows = cache[:, src // ps, :, src % ps]  # (L, n, KV, D), read before any write
        return cache.at[:, dst // ps, :, dst % ps].set(rows)

    return move(k_cache), move(v_cache)
