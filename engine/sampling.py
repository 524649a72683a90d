"""The on-device sampler (what a request asks for is engine/sampling_params.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch
from sgljax.engine.sampling_params import MAX_TOP_LOGPROBS


def _row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def _sample_stochastic(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / temp
    keys = jax.vmap(_row_key)(sb.seeds, sb.steps)
    # Sorting the vocabulary is most of a sampling step's cost on CPU (about 40 ms a row
    # for 151k tokens): only when some row filters by top-k, top-p or min-p.
    filtered = jnp.any((sb.top_k > 0) | (sb.top_p < 1) | (sb.min_p > 0))
    picked = jax.lax.cond(filtered, lambda: _sample_filtered(scaled, sb, keys),
                          lambda: jax.vmap(jax.random.categorical)(keys, scaled))
    return jnp.where(sb.temperature > 0, picked, jnp.argmax(logits, axis=-1))


def _sample_filtered(scaled: jax.Array, sb: SamplingBatch, keys: jax.Array) -> jax.Array:
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (sb.top_k[:, None] <= 0) | (rank < sb.top_k[:, None])
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < sb.top_p[:, None]
    keep &= probs >= sb.min_p[:, None] * probs[:, :1]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _choose_adjusted(adjusted: jax.Array, sb: SamplingBatch) -> jax.Array:
    # Inactive adjustments are exact no-ops (penalty 1, bias 0), so this branch may see
    # them; only a step with a sampling request pays for the sort.
    return jax.lax.cond(sb.all_greedy, lambda: jnp.argmax(adjusted, axis=-1),
                        lambda: _sample_stochastic(adjusted, sb)).astype(jnp.int32)


def adjust_logits(logits: jax.Array, adjust: LogitAdjust) -> jax.Array:
    seen_pos = adjust.seen & (logits > 0)
    rep = adjust.repetition_penalty[:, None]
    logits = jnp.where(seen_pos, logits / rep, jnp.where(adjust.seen, logits * rep, logits))
    return logits + adjust.bias


def allowed_tokens(bits: jax.Array, vocab: int) -> jax.Array:
    """(S, W) packed int32 → (S, vocab) bool: bit j of word w allows token 32 * w + j."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    unpacked = (bits[:, :, None] >> shifts) & 1  # arithmetic shift: bit 31 survives & 1
    return unpacked.reshape(bits.shape[0], -1)[:, :vocab].astype(bool)


def constrain(logits: jax.Array, grammar: GrammarMask) -> jax.Array:
    return jax.lax.cond(grammar.active,
                        lambda: jnp.where(allowed_tokens(grammar.bits, logits.shape[-1]),
                                          logits, -jnp.inf),
                        lambda: logits)


def sample(logits: jax.Array, sb: SamplingBatch, adjust: LogitAdjust, grammar: GrammarMask):
    """logits (S, V) float32 → tokens (S,), their logprobs (S,), top-20 (ids, logprobs).

    ``adjust``, when active, applies repetition penalty and an additive bias
    (presence/frequency penalties, logit_bias and min_tokens, folded in by the
    host) before choosing; ``grammar``, when active, then rules out the tokens a
    constrained request's grammar does not allow. Logprobs are the model's own
    (before temperature, penalties and grammar), as OpenAI servers report them.

    The greedy tokens and the log-normalizer are computed outside the conds, and no
    (S, V) temporary is written: inside a cond XLA CPU fused the (S, V) work worse, and
    each (S, V) buffer it wrote cost several ms (figures in benchmarks/README.md).
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    plain_greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(
        sb.all_greedy & ~adjust.active & ~grammar.active,
        lambda: plain_greedy,
        lambda: _choose_adjusted(constrain(adjust_logits(logits, adjust), grammar), sb),
    )
    # log_softmax(x)[i] = x[i] - logsumexp(x): one reduction per row, no (S, V) array.
    lse = top[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    # A top-k over the vocabulary costs several log-softmaxes (25 ms at 64 rows of
    # Qwen's 151k vocabulary on CPU): only when a request in the step wants it.
    top_vals, top_ids = jax.lax.cond(
        sb.want_top,
        lambda: tuple(jax.lax.top_k(logits, MAX_TOP_LOGPROBS)),
        lambda: (jnp.zeros((logits.shape[0], MAX_TOP_LOGPROBS), logits.dtype),
                 jnp.zeros((logits.shape[0], MAX_TOP_LOGPROBS), jnp.int32)),
    )
    return tokens, chosen, top_ids.astype(jnp.int32), top_vals - lse[:, None]
