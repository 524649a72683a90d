"""The on-device sampler (engine/sampling.py) against numpy: greedy tokens, logit
adjustments, rows that sample beside rows that don't, logprobs and top logprobs."""

import jax
import numpy as np
import pytest

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch
from sgljax.engine.sampling import MAX_TOP_LOGPROBS, allowed_tokens, sample

S, V = 4, 300


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(temperature, want_top):
    temperature = np.asarray(temperature, np.float32)
    return SamplingBatch(temperature, np.zeros(S, np.int32), np.ones(S, np.float32),
                         np.zeros(S, np.float32), np.arange(S, dtype=np.uint32),
                         np.zeros(S, np.int32), np.asarray(bool((temperature == 0).all())),
                         np.asarray(want_top))


def _adjust(active):
    if not active:
        return LogitAdjust(np.asarray(False), np.zeros((S, V), np.float32),
                           np.zeros((S, V), bool), np.ones(S, np.float32))
    bias = np.zeros((S, V), np.float32)
    bias[:, 7] = 50.0  # row 0..S-1 all pushed to token 7, except where penalized below
    seen = np.zeros((S, V), bool)
    seen[1, 7] = True
    rep = np.asarray([1.0, 1e4, 1.0, 1.0], np.float32)  # row 1 penalizes token 7 away
    return LogitAdjust(np.asarray(True), bias, seen, rep)


def _grammar(allowed=None):
    """Packed bits of an (S, V) bool array (None: every token, inactive)."""
    W = -(-V // 32)
    if allowed is None:
        return GrammarMask(np.asarray(False), np.full((S, W), -1, np.int32))
    padded = np.zeros((S, W * 32), bool)
    padded[:, :V] = allowed
    bits = np.packbits(padded, axis=-1, bitorder="little").view(np.int32)
    return GrammarMask(np.asarray(True), bits)


def _adjusted_np(logits, adj):
    seen, rep = np.asarray(adj.seen), np.asarray(adj.repetition_penalty)[:, None]
    out = np.where(seen & (logits > 0), logits / rep, np.where(seen, logits * rep, logits))
    return out + np.asarray(adj.bias)


@pytest.mark.parametrize("adjust_on", [False, True])
@pytest.mark.parametrize("temperature", [[0, 0, 0, 0], [0, 1.0, 0, 0.7]])
def test_sample_matches_numpy(adjust_on, temperature):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((S, V)) * 3).astype(np.float32)
    adj = _adjust(adjust_on)
    tokens, chosen, top_ids, top_vals = jax.jit(sample)(logits, _batch(temperature, True), adj,
                                                        _grammar())
    tokens, chosen = np.asarray(tokens), np.asarray(chosen)
    greedy = _adjusted_np(logits, adj).argmax(-1)
    for row, temp in enumerate(temperature):
        if temp == 0:
            assert tokens[row] == greedy[row], row
        assert 0 <= tokens[row] < V
    if adjust_on and temperature[0] == 0:
        assert tokens[0] == 7 and tokens[1] != 7  # the bias and the penalty took effect
    # Logprobs are the model's own, before any adjustment or temperature.
    logp = _log_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(chosen, logp[np.arange(S), tokens], atol=1e-5)
    want_ids = np.argsort(-logp, -1)[:, :MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(top_ids), want_ids)
    np.testing.assert_allclose(np.asarray(top_vals), np.take_along_axis(logp, want_ids, -1),
                               atol=1e-5)


def test_bitmask_unpacks_every_bit():
    rng = np.random.default_rng(3)
    allowed = rng.random((S, V)) < 0.3
    allowed[:, 31] = allowed[:, 63] = True  # the sign bit of a word
    np.testing.assert_array_equal(np.asarray(allowed_tokens(_grammar(allowed).bits, V)), allowed)


@pytest.mark.parametrize("temperature", [[0, 0, 0, 0], [1.0, 1.0, 0, 0.7]])
@pytest.mark.parametrize("adjust_on", [False, True])
def test_grammar_mask_limits_the_choice(temperature, adjust_on):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((S, V)) * 3).astype(np.float32)
    allowed = np.zeros((S, V), bool)
    allowed[0, [5, 250]] = True
    allowed[1, 299] = True
    allowed[2] = True  # an unconstrained row in a constrained step
    allowed[3, 100:140] = True
    for seed in range(5):
        b = _batch(temperature, False)
        b.seeds = np.arange(S, dtype=np.uint32) + 10 * seed
        tokens, chosen, _, _ = jax.jit(sample)(logits, b, _adjust(adjust_on), _grammar(allowed))
        tokens = np.asarray(tokens)
        assert allowed[np.arange(S), tokens].all(), tokens
        masked = np.where(allowed, _adjusted_np(logits, _adjust(adjust_on)), -np.inf)
        for row, temp in enumerate(temperature):
            if temp == 0:
                assert tokens[row] == masked[row].argmax()
        # logprobs stay the model's own
        logp = _log_softmax(logits.astype(np.float64))
        np.testing.assert_allclose(np.asarray(chosen), logp[np.arange(S), tokens], atol=1e-5)
