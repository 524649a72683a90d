"""EAGLE's token trees (``--speculative-eagle-topk`` k > 1): the head's beam search over
draft tokens, on the device, after each step (engine/eagle_draft.py calls it).

Level 1 is the k likeliest tokens of the head's output at a sequence's last kept
row. Each further pass runs the head on the k frontier nodes of a sequence at once,
each seeing the sequence's cache and its own ancestors only (``tree_bits``), takes
the k likeliest children of each, and keeps the k of those k * k with the highest
score (the sum of log-probabilities along the path) as the next frontier. The tree
verified is the ``num_nodes`` best-scored nodes of all levels: a child scores below
its parent, so they are closed under ancestors, and ordered by level, parents before
children (EAGLE-2's dynamic draft tree, Li et al. 2024).

The frontier's K/V go to positions past the sequence's last token, level by level,
k at a time (the scheduler holds ``(steps - 1) * k`` of them: ``draft_lookahead``);
the step that verifies the tree overwrites them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgljax.engine.batch import StepBatch
from sgljax.kernels.paged_attention import TREE_SPAN

LEVEL_PENALTY = 1e-3  # keeps a child's score strictly below its parent's (log p can be 0)


def slots_at(page_table: jax.Array, positions: jax.Array, writes: jax.Array,
             page_size: int) -> jax.Array:
    """Cache slots of tokens at ``positions`` (N,) of sequences ``page_table`` (N, P); page
    0 where ``writes`` is False or the position is past the page table."""
    idx = positions // page_size
    ok = writes & (idx < page_table.shape[1])
    page = jnp.take_along_axis(page_table, jnp.minimum(idx, page_table.shape[1] - 1)[:, None],
                               axis=1)[:, 0]
    return jnp.where(ok, page, 0) * page_size + positions % page_size


def _log_top(logits_fn, h: jax.Array, k: int):
    """The k likeliest tokens (target ids) of the head's outputs h (D, N) and their
    log-probabilities: (N, k) each."""
    logits, ids = logits_fn(h)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top, at = jax.lax.top_k(logp, k)
    return (at if ids is None else ids[at]).astype(jnp.int32), top


def tree_bits_of_ancestors(index: jax.Array, ancestors: jax.Array) -> jax.Array:
    """tree_bits of frontier nodes at region ``index`` (S, k) whose ancestors' region
    indices are the bits of ``ancestors`` (S, k); before the region: the prefix."""
    back = jnp.arange(TREE_SPAN, dtype=jnp.int32)
    at = index[..., None] - back  # the region index ``back`` positions before
    seen = (at < 0) | (back == 0) | (((ancestors[..., None] >> jnp.clip(at, 0, 31)) & 1) == 1)
    return jnp.sum(jnp.where(seen, jnp.left_shift(jnp.int32(1), back), 0), axis=-1,
                   dtype=jnp.int32)


def draft_tree(run, logits_fn, hidden: jax.Array, start: jax.Array, batch: StepBatch,
               sampling: jax.Array, k_cache, v_cache, *, steps: int, k: int, num_nodes: int,
               page_size: int):
    """hidden (D, S): the head's output at each sequence's last kept row, at ``start`` (S,).
    ``run(tokens, hidden, step, k_cache, v_cache)`` is one head pass, ``logits_fn(h)`` its
    logits. → (drafts (S, num_nodes), parents (S, num_nodes), k_cache, v_cache)."""
    S, width = batch.page_table.shape
    live = jnp.arange(S) < batch.num_seqs
    tokens, scores = _log_top(logits_fn, hidden, k)  # level 1
    cand_tok, cand_score, cand_parent = [tokens], [scores], [jnp.full((S, k), -1, jnp.int32)]
    front_id = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (S, k))
    front_h = jnp.repeat(hidden, k, axis=1)  # (D, S * k): each beam's parent output
    ancestors = jnp.zeros((S, k), jnp.int32)
    first = start + 1  # the region: where the frontier's K/V go
    table = jnp.repeat(batch.page_table, k, axis=0)
    for level in range(1, steps):
        index = (level - 1) * k + jnp.arange(k, dtype=jnp.int32)[None, :]  # (1, k)
        cached = (first[:, None] + index).reshape(-1)
        step = StepBatch(
            tokens=tokens.reshape(-1),
            positions=jnp.repeat(start + level, k),
            slots=slots_at(table, cached, jnp.repeat(sampling, k), page_size),
            page_table=batch.page_table,
            cu_q_lens=jnp.minimum(jnp.arange(S + 1, dtype=jnp.int32), batch.num_seqs) * k,
            kv_lens=jnp.where(live, jnp.minimum(first + level * k, width * page_size), 0),
            num_seqs=batch.num_seqs, last_index=jnp.arange(S), prev_rows=jnp.full((S,), -1),
            tree_bits=tree_bits_of_ancestors(jnp.broadcast_to(index, (S, k)), ancestors).reshape(-1))
        h, k_cache, v_cache = run(tokens.reshape(-1), front_h, step, k_cache, v_cache)
        child_tok, child_logp = _log_top(logits_fn, h, k)  # (S * k, k)
        child_score = (scores[:, :, None] + child_logp.reshape(S, k, k)
                       - LEVEL_PENALTY).reshape(S, k * k)
        offset = k + (level - 1) * k * k
        cand_tok.append(child_tok.reshape(S, k * k))
        cand_score.append(child_score)
        cand_parent.append(jnp.repeat(front_id, k, axis=1))
        scores, pick = jax.lax.top_k(child_score, k)  # the next frontier
        beam = pick // k
        tokens = jnp.take_along_axis(cand_tok[-1], pick, axis=1)
        front_id = offset + pick.astype(jnp.int32)
        front_h = jnp.take_along_axis(h.reshape(-1, S, k), beam[None], axis=2).reshape(-1, S * k)
        ancestors = (jnp.take_along_axis(ancestors, beam, axis=1)
                     | jnp.left_shift(jnp.int32(1), (level - 1) * k + beam))
    tok, score, parent = (jnp.concatenate(c, axis=1) for c in (cand_tok, cand_score, cand_parent))
    chosen = jnp.sort(jax.lax.top_k(score, num_nodes)[1], axis=1)  # by level: parents first
    rows = jnp.arange(S)[:, None]
    node_of = jnp.zeros(score.shape, jnp.int32).at[rows, chosen].set(
        jnp.arange(1, num_nodes + 1, dtype=jnp.int32))
    up = jnp.take_along_axis(parent, chosen, axis=1)
    parents = jnp.where(up < 0, 0, jnp.take_along_axis(node_of, jnp.maximum(up, 0), axis=1))
    return jnp.take_along_axis(tok, chosen, axis=1), parents, k_cache, v_cache
