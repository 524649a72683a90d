"""Packing: a scheduled batch (engine/batch.py's ``ScheduledBatch``) as the padded
arrays a step consumes: the ragged ``StepBatch`` (each sequence's tokens one after
another, padded to a bucket), the per-row ``SamplingBatch``, and the ``LogitAdjust`` and
``GrammarMask`` of the rows that need them. Host-side numpy only; the model runner
(engine/model_runner.py) places and runs them.
"""

from __future__ import annotations

import numpy as np

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch, ScheduledBatch, StepBatch
from sgljax.engine.buckets import BucketPlan
from sgljax.engine.grammar import fill_masks
from sgljax.engine.request import Sequence
from sgljax.engine.speculative import node_depths
from sgljax.kernels.paged_attention import tree_bits_of


class StepPacker:
    def __init__(self, plan: BucketPlan, page_size: int, vocab_size: int, hidden_size: int,
                 num_draft_tokens: int = 0, trees: bool = False, eagle: bool = False):
        self.plan, self.page_size = plan, page_size
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_draft_tokens = num_draft_tokens  # speculative: drafts a verify row holds
        self.trees = trees  # EAGLE token trees: every step has tree_bits
        self.eagle = eagle  # EAGLE: every step has chunk_next

    def pack(self, sched: ScheduledBatch, last_rows: dict[str, int]) -> tuple[
            StepBatch, SamplingBatch, LogitAdjust | None, GrammarMask | None]:
        """The ragged step's arrays: each sequence's tokens one after another."""
        ps = self.page_size
        # A carried row (below) holds pages for as far up as the drafts in flight reach.
        max_pages = max(len(s.pages) if s.num_pending else -(-(s.num_computed + n) // ps)
                        for s, n in zip(sched.seqs, sched.chunk_lens))
        T, S, P = self.plan.shape_for(sched.num_tokens, len(sched.seqs), max_pages)
        tokens = np.zeros((T,), np.int32)
        positions = np.zeros((T,), np.int32)
        slots = np.zeros((T,), np.int32)  # padding writes into page 0, which nobody owns
        page_table = np.zeros((S, P), np.int32)
        cu_q_lens = np.full((S + 1,), sched.num_tokens, np.int32)
        kv_lens = np.zeros((S,), np.int32)
        K = self.num_draft_tokens
        last_index = np.zeros((S, K + 1) if K else (S,), np.int32)
        drafts = np.zeros((S, K), np.int32)
        parents = np.tile(np.arange(K, dtype=np.int32), (S, 1))  # chains, unless a tree
        num_drafts = np.zeros((S,), np.int32)
        draft_room = np.zeros((S,), np.int32)
        tree_bits = np.full((T,), -1, np.int32)
        prev_rows = np.full((S,), -1, np.int32)
        chunk_next = np.full((S,), -1, np.int32)
        at = 0
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.chunk_lens)):
            start = seq.num_computed
            pos = np.arange(start, start + n, dtype=np.int32)
            pages = np.asarray(seq.pages, np.int32)
            draft = sched.drafts_of(i)
            if draft:  # a verify row: its last token, then the drafts, each sampled from
                drafts[i, :len(draft)] = draft
                num_drafts[i] = len(draft)
                draft_room[i] = seq.draft_room
                last_index[i] = at + np.minimum(np.arange(K + 1), len(draft))
            carried = seq.num_pending and self.eagle  # (spec_overlap.py fixes it on the device)
            if seq.num_pending:  # its first token is the step in flight's, on the device;
                # with EAGLE so are its drafts and where it starts
                assert n == 1 + len(draft) and seq.num_pending == 1, (seq.rid, n, draft)
                prev_rows[i] = last_rows[seq.rid]
            else:
                tokens[at:at + n] = seq.all_ids[start:start + n - len(draft)] + draft
                tree = sched.parents_of(i)
                if tree != list(range(len(draft))):  # not a chain: nodes at start + depth,
                    # seeing their ancestors only
                    parents[i, :len(draft)] = tree
                    tree_bits[at:at + n] = tree_bits_of(tree)
                    pos = start + node_depths(tree)
            positions[at:at + n] = pos
            if not carried:
                cached = np.arange(start, start + n)  # a tree node's K/V: at its node's index
                slots[at:at + n] = pages[cached // ps] * ps + cached % ps
            page_table[i, :len(pages)] = pages
            cu_q_lens[i] = at
            kv_lens[i] = start + n
            if start + n < seq.num_tokens:  # a prompt chunk short of the prompt's end
                chunk_next[i] = seq.all_ids[start + n]
            at += n
            if not draft:
                last_index[i] = at - 1
        batch = StepBatch(tokens, positions, slots, page_table, cu_q_lens, kv_lens,
                          np.asarray(len(sched.seqs), np.int32), last_index, prev_rows)
        if K:
            batch.drafts, batch.num_drafts, batch.draft_parents = drafts, num_drafts, parents
            batch.draft_room = draft_room
        if self.trees:
            batch.tree_bits = tree_bits
        if self.eagle:
            batch.chunk_next = chunk_next
        if any(s.audio_embeds is not None for s in sched.seqs):
            embeds, mask = pack_audio_embeds(sched, T, self.hidden_size)
            if mask.any():  # a chunk covers audio placeholders: the step's audio form
                batch.embeds, batch.embed_mask = embeds, mask
        return (batch, self.sampling(sched.seqs, S), self.adjust(sched.seqs, S),
                self.grammar(sched, S))

    def sampling(self, seqs: list[Sequence], S: int) -> SamplingBatch:
        pad = S - len(seqs)
        col = lambda f, dt: np.asarray([f(s.params) for s in seqs] + [0] * pad, dt)  # noqa: E731
        return SamplingBatch(
            temperature=col(lambda p: p.temperature, np.float32),
            top_k=col(lambda p: max(p.top_k, 0), np.int32),
            top_p=np.asarray([s.params.top_p for s in seqs] + [1.0] * pad, np.float32),
            min_p=col(lambda p: p.min_p, np.float32),
            seeds=col(lambda p: p.seed & 0xFFFFFFFF, np.uint32),
            steps=np.asarray([s.num_generated for s in seqs] + [0] * pad, np.int32),
            all_greedy=np.asarray(all(s.params.temperature == 0 for s in seqs)),
            want_top=np.asarray(any(s.params.top_logprobs > 0 for s in seqs)),
        )

    def adjust(self, seqs: list[Sequence], S: int) -> LogitAdjust | None:
        if not any(s.params.adjusts_logits for s in seqs):
            return None  # the step uses the zeros kept on the device
        V = self.vocab_size
        bias = np.zeros((S, V), np.float32)
        seen = np.zeros((S, V), bool)
        rep = np.ones((S,), np.float32)
        for i, s in enumerate(seqs):
            p = s.params
            if p.presence_penalty or p.frequency_penalty:
                ids, counts = np.unique(np.asarray(s.output_ids, np.int64), return_counts=True)
                bias[i, ids] -= p.presence_penalty + p.frequency_penalty * counts
            if p.repetition_penalty != 1:
                seen[i, np.asarray(s.all_ids, np.int64)] = True
                rep[i] = p.repetition_penalty
            for tok, b in p.logit_bias.items():
                bias[i, int(tok)] += b
            if len(s.output_ids) < p.min_tokens:
                bias[i, sorted(s.stop_ids)] = -np.inf
        return LogitAdjust(np.asarray(True), bias, seen, rep)

    def grammar(self, sched: ScheduledBatch, S: int) -> GrammarMask | None:
        """Masks of the constrained rows that sample in this step (the host knows every
        token they generated: constrained requests turn the overlap off, engine.py)."""
        if not any(s.grammar is not None for s in sched.seqs):
            return None  # the step uses the all-ones mask kept on the device
        samples = [seq.num_computed + n == seq.num_tokens
                   for seq, n in zip(sched.seqs, sched.chunk_lens)]
        states = [seq.grammar if sampled else None
                  for seq, sampled in zip(sched.seqs, samples)]
        return GrammarMask(np.asarray(True), fill_masks(states, S, self.vocab_size))


def pack_audio_embeds(sched: ScheduledBatch, T: int, hidden: int):
    """The (T, hidden) override rows and (T,) mask of a step: each sequence's audio
    encoder outputs at its chunk's <|audio_pad|> positions."""
    embeds = np.zeros((T, hidden), np.float32)
    mask = np.zeros((T,), bool)
    at = 0
    for seq, n in zip(sched.seqs, sched.chunk_lens):
        if seq.audio_embeds is not None:
            start = seq.num_computed
            pos = seq.audio_positions  # sorted prompt indices of the placeholders
            lo, hi = np.searchsorted(pos, start), np.searchsorted(pos, start + n)
            rows = at + (pos[lo:hi] - start)
            embeds[rows] = seq.audio_embeds[lo:hi]
            mask[rows] = True
        at += n
    return embeds, mask
