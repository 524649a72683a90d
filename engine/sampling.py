"""The on-device sampler (what a request asks for is engine/sampling_params.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch
from sgljax.engine.sampling_params import MAX_TOP_LOGPROBS


def row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def _sample_stochastic(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / temp
    keys = jax.vmap(row_key)(sb.seeds, sb.steps)
    # Sorting the vocabulary is most of a sampling step's cost on CPU (about 40 ms a row
    # for 151k tokens): only when some row filters by top-k, top-p or min-p.
    filtered = jnp.any((sb.top_k > 0) | (sb.top_p < 1) | (sb.min_p > 0))
    picked = jax.lax.cond(filtered, lambda: _sample_filtered(scaled, sb, keys),
                          lambda: jax.vmap(jax.random.categorical)(keys, scaled))
    return jnp.where(sb.temperature > 0, picked, jnp.argmax(logits, axis=-1))


def _keep_sorted(sorted_logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Which of each row's tokens, sorted by descending logit, top-k, top-p and min-p keep."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(sorted_logits.shape[-1])[None, :]
    keep = (sb.top_k[:, None] <= 0) | (rank < sb.top_k[:, None])
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < sb.top_p[:, None]
    keep &= probs >= sb.min_p[:, None] * probs[:, :1]
    return keep


def _sample_filtered(scaled: jax.Array, sb: SamplingBatch, keys: jax.Array) -> jax.Array:
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    masked = jnp.where(_keep_sorted(sorted_logits, sb), sorted_logits, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def target_logits(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """The distribution a stochastic row samples from, as logits in vocabulary order:
    scaled by its temperature, -inf where top-k, top-p or min-p filter a token out."""
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / temp

    def filtered():
        order = jnp.argsort(-scaled, axis=-1)
        keep = _keep_sorted(jnp.take_along_axis(scaled, order, axis=-1), sb)
        rows = jnp.arange(scaled.shape[0])[:, None]
        kept = jnp.zeros_like(keep).at[rows, order].set(keep)
        return jnp.where(kept, scaled, -jnp.inf)

    return jax.lax.cond(jnp.any((sb.top_k > 0) | (sb.top_p < 1) | (sb.min_p > 0)),
                        filtered, lambda: scaled)


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


def choose(logits: jax.Array, sb: SamplingBatch, adjust: LogitAdjust,
           grammar: GrammarMask) -> jax.Array:
    """logits (S, V) float32 → the sampled token of each row (S,) int32.

    ``adjust``, when active, applies repetition penalty and an additive bias
    (presence/frequency penalties, logit_bias and min_tokens, folded in by the
    host) before choosing; ``grammar``, when active, then rules out the tokens a
    constrained request's grammar does not allow. The greedy tokens are computed
    outside the cond: inside one XLA CPU fused the (S, V) work worse, and each (S, V)
    buffer it wrote cost several ms (figures in benchmarks/README.md)."""
    plain_greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(
        sb.all_greedy & ~adjust.active & ~grammar.active,
        lambda: plain_greedy,
        lambda: _choose_adjusted(constrain(adjust_logits(logits, adjust), grammar), sb),
    )


def report(logits: jax.Array, tokens: jax.Array, want_top: jax.Array):
    """The logprobs of the chosen ``tokens`` (R,) under ``logits`` (R, V), and each row's
    top-20 (ids, logprobs). Logprobs are the model's own (before temperature, penalties
    and grammar), as OpenAI servers report them; no (R, V) temporary is written."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    # log_softmax(x)[i] = x[i] - logsumexp(x): one reduction per row, no (S, V) array.
    lse = top[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse
    # A top-k over the vocabulary costs several log-softmaxes (25 ms at 64 rows of
    # Qwen's 151k vocabulary on CPU): only when a request in the step wants it.
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])  # a vocabulary under 20 pads the rest
    pad = ((0, 0), (0, MAX_TOP_LOGPROBS - k))
    top_vals, top_ids = jax.lax.cond(
        want_top,
        lambda: tuple(jnp.pad(x, pad) for x in jax.lax.top_k(logits, k)),
        lambda: (jnp.zeros((logits.shape[0], MAX_TOP_LOGPROBS), logits.dtype),
                 jnp.zeros((logits.shape[0], MAX_TOP_LOGPROBS), jnp.int32)),
    )
    return chosen, top_ids.astype(jnp.int32), top_vals - lse[:, None]


def sample(logits: jax.Array, sb: SamplingBatch, adjust: LogitAdjust, grammar: GrammarMask):
    """logits (S, V) float32 → tokens (S,), their logprobs (S,), top-20 (ids, logprobs)."""
    tokens = choose(logits, sb, adjust, grammar)
    return (tokens, *report(logits, tokens, sb.want_top))
