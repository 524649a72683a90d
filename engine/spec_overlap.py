"""Speculative decoding under the overlap schedule: a verify row packed before the step
before it lands.

With the overlap schedule the host packs step N+1 while step N runs (engine.py). A
sequence decoding with EAGLE drafts that is in both steps has a row in N+1 whose
inputs the host cannot know yet: how many of step N's drafts the target kept (so
where the row starts), the token step N emitted last, and the drafts the head
proposed after step N. The host packs such a *carried* row as if step N kept none of
its drafts, with the right number of tokens (1 + the drafts it may verify) and pages
for the case that step N kept all of them; ``carry_in`` then fixes the row on the
device from what step N left there (``StepCarry``): its positions and cache slots
move up by the drafts step N kept, its tokens and tree are the head's proposal, and
its sampling keys count the tokens step N emitted, and it verifies no more drafts
than max_tokens leaves room for after step N's. The step then runs as if the host had
packed it after step N landed: greedy outputs equal running one step at a time, and
so do sampled ones wherever the token budget gave each row the same drafts.

NGRAM drafts are looked up on the host in the tokens step N emits, so NGRAM still
lands each step before packing the next.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sgljax.engine.batch import SamplingBatch, StepBatch, StepCarry
from sgljax.engine.eagle_tree import slots_at, tree_bits_of_ancestors
from sgljax.engine.speculative import tree_depths


def tree_bits_on_device(parent: jax.Array) -> jax.Array:
    """(S, R) tree_bits of rows of nodes 0..R-1 whose parents are ``parent`` (S, R)
    (node 0's is ignored): kernels/paged_attention.py's ``tree_bits_of``, batched."""
    S, R = parent.shape
    ancestors = jnp.zeros((S, R), jnp.int32)  # bit a of node i's: node a is above it
    for i in range(1, R):  # parents come first: one pass
        p = parent[:, i]
        above = jnp.take_along_axis(ancestors, p[:, None], axis=1)[:, 0]
        ancestors = ancestors.at[:, i].set(above | jnp.left_shift(jnp.int32(1), p))
    return tree_bits_of_ancestors(jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32), (S, R)),
                                  ancestors)


def carry_in(batch: StepBatch, sbatch: SamplingBatch, carry: StepCarry, page_size: int):
    """Fix the carried rows of an EAGLE step (``batch.prev_rows`` >= 0) from what
    the step before left in ``carry``; other rows stay as the host packed them."""
    T, (S, K) = batch.tokens.shape[0], batch.drafts.shape
    fed = batch.prev_rows >= 0
    prev = jnp.maximum(batch.prev_rows, 0)
    shift = jnp.where(fed, carry.accepted[prev], 0)  # drafts the step before kept
    proposal = carry.proposal[prev]  # the head's, after the step before
    drafts = jnp.where(fed[:, None], proposal[:, 0], batch.drafts)
    parents = jnp.where(fed[:, None], proposal[:, 1], batch.draft_parents)
    t = jnp.arange(T)
    row = jnp.clip(jnp.searchsorted(batch.cu_q_lens[1:], t, side="right"), 0, S - 1)
    local = t - batch.cu_q_lens[row]  # the token's node in its row
    mine = (t < batch.cu_q_lens[batch.num_seqs]) & fed[row]
    node = jnp.clip(local, 0, K)
    draft_token = drafts[row, jnp.clip(local - 1, 0, K - 1)]
    tokens = jnp.where(mine & (local >= 1), draft_token, batch.tokens)
    # The host packed a carried row's positions as start + node, before the shift.
    cached = batch.positions + shift[row]  # a node's K/V go to its node's slot
    slots = jnp.where(mine, slots_at(batch.page_table[row], cached, mine, page_size),
                      batch.slots)
    positions, tree_bits = jnp.where(mine, cached, batch.positions), batch.tree_bits
    if tree_bits is not None:  # a tree's nodes sit at start + depth, seeing their ancestors
        full = jnp.concatenate([jnp.zeros((S, 1), parents.dtype), parents], axis=1)
        positions = jnp.where(mine, cached - local + tree_depths(full)[row, node], positions)
        tree_bits = jnp.where(mine, tree_bits_on_device(full)[row, node], tree_bits)
    # Drafts past max_tokens once the step before's are counted are dropped: the row's
    # tokens after them still run, and nothing reads what they compute.
    num_drafts = jnp.where(fed, jnp.clip(batch.draft_room - shift, 0, batch.num_drafts),
                           batch.num_drafts)
    last_index = jnp.where(
        fed[:, None], batch.cu_q_lens[:S, None] + jnp.minimum(jnp.arange(K + 1), num_drafts[:, None]),
        batch.last_index)
    batch = dataclasses.replace(
        batch, tokens=tokens, positions=positions, slots=slots, kv_lens=batch.kv_lens + shift,
        drafts=drafts, draft_parents=parents, tree_bits=tree_bits, num_drafts=num_drafts,
        last_index=last_index)
    return batch, dataclasses.replace(sbatch, steps=sbatch.steps + shift)
