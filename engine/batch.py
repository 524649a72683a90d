"""What one step is: the scheduler's decision, and the padded arrays the device consumes.

The scheduler decides (``ScheduledBatch``), the model runner packs its decision
into a ``StepBatch`` and a ``SamplingBatch``: small arrays that describe the whole
step, so they can be cached per shape, sent to other hosts and fed to the
jitted step function as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    from sgljax.engine.request import Sequence


@dataclass
class ScheduledBatch:
    """The scheduler's decision for one step: which sequences, with how many tokens.

    One ragged step: every running decode (one token each) first, then prompt chunks."""

    seqs: list["Sequence"]
    chunk_lens: list[int]  # tokens computed for each sequence in this step
    num_decodes: int = 0  # the first rows: running decodes, one token each
    # Per row, set when the step is launched: does it sample the sequence's next token
    # (False for a prompt chunk that does not reach the end of the prompt)?
    samples: list[bool] = field(default_factory=list)
    # Speculative decoding: the draft tokens each decode row feeds after its last token
    # (its chunk is 1 + len(drafts)); empty without speculation (engine/speculative.py).
    drafts: list[list[int]] = field(default_factory=list)

    # Token trees: each draft's parent (engine/speculative.py); a row without (or with an
    # empty list) is a chain.
    draft_parents: list[list[int]] = field(default_factory=list)

    def drafts_of(self, row: int) -> list[int]:
        return self.drafts[row] if row < len(self.drafts) else []

    def parents_of(self, row: int) -> list[int]:
        tree = self.draft_parents[row] if row < len(self.draft_parents) else []
        return tree or list(range(len(self.drafts_of(row))))

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_lens)


@jax.tree_util.register_dataclass
@dataclass
class StepBatch:
    """A ragged step: T query tokens, flat, of S sequences (kernels/paged_attention.py).

    Sequence ``s`` owns tokens ``cu_q_lens[s]:cu_q_lens[s + 1]``; rows past ``num_seqs``
    and tokens past ``cu_q_lens[num_seqs]`` are padding."""

    tokens: jax.Array  # (T,) int32 input token ids, padding 0
    positions: jax.Array  # (T,) int32 absolute positions
    slots: jax.Array  # (T,) int32 cache slot each token's K/V is written to (padding → page 0)
    page_table: jax.Array  # (S, P) int32 pages owned by each sequence (padding → page 0)
    cu_q_lens: jax.Array  # (S + 1,) int32 where each sequence's tokens start
    kv_lens: jax.Array  # (S,) int32 cached tokens per sequence after this step (padding 0)
    num_seqs: jax.Array  # () int32 sequences in use
    # (S,) int32 index in T of the token each sequence samples from; with speculative
    # decoding (S, k + 1): the positions of its last token and its k draft slots.
    last_index: jax.Array
    # (S,) int32: the row of the previous step whose sampled token is this sequence's first
    # input token (the overlap schedule packs a step before the host knows that token), or -1.
    prev_rows: jax.Array
    # Embedding override (steps with audio prompts only; None otherwise, which keeps
    # text-only steps as they were): (T, D) float32 rows that replace the token
    # embedding where ``embed_mask`` (T,) bool is set (Qwen3-ASR's <|audio_pad|>
    # positions take the audio encoder's outputs). Part of the step's bucket key.
    embeds: jax.Array | None = None
    embed_mask: jax.Array | None = None
    # Speculative decoding (every step of an engine with it; None otherwise): (S, k) int32
    # draft tokens each row verifies, and (S,) int32 how many of them are real.
    drafts: jax.Array | None = None
    num_drafts: jax.Array | None = None
    # (S,) int32 the most drafts a row may verify before its max_tokens, as the host
    # counts: a carried row (engine/spec_overlap.py) verifies fewer if the step before
    # kept drafts.
    draft_room: jax.Array | None = None
    # EAGLE (engine/eagle_draft.py): (S,) int32 the token after a prompt chunk that stops
    # short of the prompt's end, -1 for rows that sample.
    chunk_next: jax.Array | None = None
    # (S, k) int32 each draft's parent node (0: the row's last token, j: draft j; a chain's
    # is j - 1), with the drafts; and with token trees (--speculative-eagle-topk > 1, else
    # None) (T,) int32 which of the 31 positions before it each token sees
    # (kernels/paged_attention.py).
    draft_parents: jax.Array | None = None
    tree_bits: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """The step's bucket: (tokens, sequences)."""
        return self.tokens.shape[0], self.page_table.shape[0]


@jax.tree_util.register_dataclass
@dataclass
class StepCarry:
    """What a step leaves on the device for the next one, one slot per sequence row of
    the widest bucket: the overlap schedule packs step N+1 before the host has step N's
    outputs, and N+1 reads them here (``StepBatch.prev_rows``; engine/spec_overlap.py)."""

    tokens: jax.Array  # (rows,) int32 each row's last emitted token
    # EAGLE: (rows,) int32 drafts kept, and (rows, 2, k) int32 the head's drafts, parents.
    accepted: jax.Array | None = None
    proposal: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclass
class SamplingBatch:
    temperature: jax.Array  # (S,) float32; 0 → greedy
    top_k: jax.Array  # (S,) int32; 0 → off
    top_p: jax.Array  # (S,) float32; 1 → off
    min_p: jax.Array  # (S,) float32; 0 → off
    seeds: jax.Array  # (S,) uint32 per-request seed
    steps: jax.Array  # (S,) int32 how many tokens the request has generated (varies the key)
    all_greedy: jax.Array  # () bool: skip the sort when nobody samples
    want_top: jax.Array  # () bool: someone asked for top_logprobs (a top-k over the vocabulary)


@jax.tree_util.register_dataclass
@dataclass
class LogitAdjust:
    """Per-request logit processing; ``active`` is False (and the arrays zeros kept on the
    device) when no request in the step asks for any, so the step skips it."""

    active: jax.Array  # () bool
    bias: jax.Array  # (S, V) float32 additive: presence/frequency penalty, logit_bias, min_tokens
    seen: jax.Array  # (S, V) bool tokens the repetition penalty applies to
    repetition_penalty: jax.Array  # (S,) float32; 1 → off


@jax.tree_util.register_dataclass
@dataclass
class GrammarMask:
    """Constrained decoding's allowed next tokens (engine/grammar.py): one bit per token
    id, packed 32 to an int32; rows without a grammar are all ones. ``active`` is False
    (and the all-ones rows kept on the device) when no request in the step has one."""

    active: jax.Array  # () bool
    bits: jax.Array  # (S, ceil(V / 32)) int32
