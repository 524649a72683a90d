"""Sampling parameters (what a user asks for) and the on-device sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from sgljax.engine.batch import LogitAdjust, SamplingBatch

MAX_TOP_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range."""


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        if self.max_tokens < 1:
            raise SamplingParamsError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise SamplingParamsError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise SamplingParamsError("top_k must be -1, 0 or positive")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty must be > 0")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise SamplingParamsError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SamplingParamsError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens must be in [0, max_tokens]")
        if vocab_size is not None:
            for tok in list(self.logit_bias) + list(self.stop_token_ids):
                if not 0 <= int(tok) < vocab_size:
                    raise SamplingParamsError(f"token id {tok} is outside the vocabulary")
        for v in self.logit_bias.values():
            if not -100 <= v <= 100:
                raise SamplingParamsError("logit_bias values must be in [-100, 100]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def _sample_stochastic(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    scaled = logits / temp
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = (sb.top_k[:, None] <= 0) | (rank < sb.top_k[:, None])
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < sb.top_p[:, None]
    keep &= probs >= sb.min_p[:, None] * probs[:, :1]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(_row_key)(sb.seeds, sb.steps)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(sb.temperature > 0, picked, jnp.argmax(logits, axis=-1))


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


def sample(logits: jax.Array, sb: SamplingBatch, adjust: LogitAdjust):
    """logits (S, V) float32 → tokens (S,), their logprobs (S,), top-20 (ids, logprobs).

    ``adjust``, when active, applies repetition penalty and an additive bias
    (presence/frequency penalties, logit_bias and min_tokens, folded in by the
    host) before choosing. Logprobs are the model's own (before temperature and
    penalties), as OpenAI servers report them.

    The greedy tokens and the log-normalizer are computed outside the conds, and no
    (S, V) temporary is written: inside a cond XLA CPU fused the (S, V) work worse, and
    each (S, V) buffer it wrote cost several ms (sampling in a decode step at
    64 x 49,152: ~30 → ~8 ms).
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    plain_greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(
        sb.all_greedy & ~adjust.active,
        lambda: plain_greedy,
        lambda: _choose_adjusted(adjust_logits(logits, adjust), sb),
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
