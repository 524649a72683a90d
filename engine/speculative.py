"""Speculative decoding's verify step: which draft tokens the target model keeps.

A decode row with k draft tokens feeds its last token and the drafts in one step
(a ragged batch like any other) and samples at all k + 1 positions: the logits
at position j are the target's distribution p_j after draft j was accepted.
Draft j + 1 is kept while the target agrees: greedy rows keep it when it is p_j's
argmax; sampling rows keep it with probability p_j(draft), and at the first
rejection draw from p_j without the draft, renormalised. With a draft that is one
token for certain (NGRAM's lookups), that is rejection sampling (Leviathan et
al. 2023, Chen et al. 2023) and every emitted token follows the target's own
distribution, top-k/top-p/min-p filters included. When all k drafts are kept the
last position gives one more token: a row emits 1 to k + 1 tokens a step.

Rows with penalties or a grammar get no drafts (their logits depend on every
token before), so their first position samples exactly as a step without
speculation does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch
from sgljax.engine.sampling import choose, report, row_key, target_logits


def verify(logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array, sb: SamplingBatch,
           adjust: LogitAdjust, grammar: GrammarMask):
    """logits (S * R, V): R = k + 1 positions a sequence; drafts (S, k); num_drafts (S,).

    Returns tokens (S, R) (row s emits ``tokens[s, :accepted[s] + 1]``), their logprobs
    (S, R), top-20 ids and logprobs (S, R, 20), and accepted (S,) drafts kept."""
    S, K = drafts.shape
    R = K + 1
    rows = logits.reshape(S, R, -1)
    at = jnp.arange(R)[None, :]
    # Row j tests draft j (the token it would emit); the last row tests none.
    tested = jnp.concatenate([drafts, jnp.zeros((S, 1), drafts.dtype)], axis=1)
    testing = at < num_drafts[:, None]
    kept, drawn = jax.lax.cond(
        jnp.any(num_drafts > 0),
        lambda: _test_drafts(rows.reshape(S * R, -1), tested, testing, sb),
        lambda: (jnp.zeros((S, R), bool), jnp.zeros((S, R), jnp.int32)))
    accepted = jnp.sum(jnp.cumprod(kept & testing, axis=1), axis=1).astype(jnp.int32)
    plain = choose(rows[:, 0], sb, adjust, grammar)  # rows without drafts
    drawn = drawn.at[:, 0].set(jnp.where(num_drafts > 0, drawn[:, 0], plain))
    tokens = jnp.where(at < accepted[:, None], tested, drawn)
    flat = tokens.reshape(-1)
    logprobs, top_ids, top_logprobs = report(logits, flat, sb.want_top)
    return (tokens, logprobs.reshape(S, R), top_ids.reshape(S, R, -1),
            top_logprobs.reshape(S, R, -1), accepted)


def _per_position(sb: SamplingBatch, R: int) -> SamplingBatch:
    """Each sequence's sampling parameters on its R positions; position j draws with
    the key of the request's (steps + j)-th token."""
    rep = lambda x: jnp.repeat(x, R)  # noqa: E731
    return dataclasses.replace(
        sb, temperature=rep(sb.temperature), top_k=rep(sb.top_k), top_p=rep(sb.top_p),
        min_p=rep(sb.min_p), seeds=rep(sb.seeds),
        steps=(sb.steps[:, None] + jnp.arange(R)[None, :]).reshape(-1))


def _test_drafts(flat: jax.Array, tested: jax.Array, testing: jax.Array, sb: SamplingBatch):
    """(S * R, V) logits → kept (S, R): the target keeps the tested token; drawn (S, R):
    the token a position emits when it is the first rejected one (or past the drafts)."""
    S, R = tested.shape
    pb = _per_position(sb, R)
    t = tested.reshape(-1)
    greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32)

    def stochastic():
        target = target_logits(flat, pb)
        keys = jax.vmap(row_key)(pb.seeds, pb.steps)
        lse = jax.nn.logsumexp(target, axis=-1)
        p_tested = jnp.exp(jnp.take_along_axis(target, t[:, None], axis=-1)[:, 0] - lse)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
        # Rejected: draw from the target without the draft (what is left, renormalised).
        without = jnp.where(testing.reshape(-1)[:, None]
                            & (jnp.arange(flat.shape[-1])[None, :] == t[:, None]),
                            -jnp.inf, target)
        draw = jax.vmap(jax.random.categorical)(keys, without).astype(jnp.int32)
        # Nothing left but the draft (p = 1 up to rounding): keep it.
        draw = jnp.where(jnp.isfinite(jnp.max(without, axis=-1)), draw, t)
        return u < p_tested, draw

    kept, drawn = jax.lax.cond(sb.all_greedy, lambda: (greedy == t, greedy), stochastic)
    greedy_rows = pb.temperature <= 0
    kept = jnp.where(greedy_rows, greedy == t, kept)
    drawn = jnp.where(greedy_rows, greedy, drawn)
    return kept.reshape(S, R), drawn.reshape(S, R)
