"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step is one ragged batch (engine/batch.py): every running decode gets its
one token first, then prompt chunks fill what is left of the token budget
(``--chunked-prefill-size``): prompts part-way through their chunks, then new
ones, at most ``new_seqs_per_prefill`` a step (1 on CPU) and
``max_prefill_seqs`` chunks in all. So a long prompt never stalls a running
decode: it shares steps with them, a chunk at a time. When the KV pool runs
dry the newest running sequence is preempted: its pages are released and it
later resumes by recomputing its tokens, producing the same output.

With the overlap schedule (engine.py) the next batch is chosen while the
previous one is still on the device: a sequence's newest token may be
pending (counted in ``num_tokens``, not yet known), and a sequence that the
step in flight brings to ``max_tokens`` is not scheduled again.

With speculative decoding each decode row carries draft tokens after its last one,
within the same budget: a drafter's lookups (NGRAM, engine/ngram.py), or what the
draft head proposed in the sequence's last step (EAGLE, engine/eagle_draft.py: its
drafting writes K/V past the step's tokens, so such sequences hold pages
``draft_lookahead`` tokens ahead). The step keeps what the target agrees with
(engine/speculative.py).

The scheduler owns every sequence's state: besides choosing steps, it applies
what a step did (``launched``: tokens computed; ``landed`` and ``append_token``:
tokens sampled, and whether that ends the sequence) and frees what a sequence held.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from sgljax.engine.batch import ScheduledBatch
from sgljax.engine.buckets import BucketPlan
from sgljax.engine.kv_cache import PagePool
from sgljax.engine.ngram import NgramDrafter
from sgljax.engine.prefix_cache import PrefixCache
from sgljax.engine.request import Sequence, Status


MIN_FILLED = 64  # token buckets from here up are filled exactly (Scheduler._fill_bucket)


@dataclass
class SchedulerConfig:
    page_size: int
    max_running_requests: int
    chunked_prefill_size: int
    context_length: int
    schedule_policy: str = "fcfs"  # or "lpm": longest cached prefix first
    new_seqs_per_prefill: int = 1  # new prompts one step takes
    max_prefill_seqs: int = 8  # prompt chunks one step holds
    head_drafts: int = 0  # EAGLE: drafts the head proposes a step (``proposed``); 0 without
    draft_lookahead: int = 0  # EAGLE: positions past a sampling row its drafting writes


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, pool: PagePool, prefix_cache: PrefixCache,
                 plan: BucketPlan, drafter: NgramDrafter | None = None):
        self.cfg = cfg
        self.drafter = drafter
        self.speculating = drafter is not None or bool(cfg.head_drafts)
        self.draft_seconds = 0.0  # host time spent proposing drafts
        self.plan = plan
        self.pool = pool
        self.cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- bookkeeping -------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_all(self) -> list[str]:
        """Abort every sequence; returns their ids."""
        rids = [s.rid for s in list(self.running) + list(self.waiting)]
        for rid in rids:
            self.abort(rid)
        return rids

    def abort(self, rid: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.rid == rid:
                self.waiting.remove(seq)
                self._free(seq, cache=False)
                seq.finish("abort")
                return seq
        for seq in self.running:
            if seq.rid == rid:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str, matched=None) -> None:
        seq.finish(reason, matched)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:  # preempted while its last step was in flight
            self.waiting.remove(seq)
        self._free(seq, cache=reason != "abort")

    def _free(self, seq: Sequence, cache: bool) -> None:
        if cache and seq.pages:
            self.cache.insert(seq.cache_ids[: seq.num_computed], seq.pages)
        self.pool.release(seq.pages)
        seq.pages = []

    # -- applying what a step did ------------------------------------------
    def launched(self, batch: ScheduledBatch) -> None:
        """The step is on the device: its K/V are being written, so later steps may read
        them; a row that completes its sequence's tokens samples the next one."""
        batch.samples = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.chunk_lens)):
            # A verify row's drafts count as computed only once the target keeps them.
            seq.num_computed += n - len(batch.drafts_of(i))
            seq.drafts_in_flight += len(batch.drafts_of(i))
            sampled = seq.num_computed == seq.num_tokens
            if sampled:
                seq.num_pending += 1
            else:  # a prompt chunk: its pages can serve other prompts already
                self.cache.insert(seq.cache_ids[:seq.num_computed], seq.pages)
            batch.samples.append(sampled)

    def landed(self, batch: ScheduledBatch) -> list[tuple[int, Sequence]]:
        """The step's tokens reached the host: (row, sequence) for each token to append.

        A sequence that ended while the step ran (aborted, or stopped by the step
        before) drops its token."""
        rows = []
        for i, (seq, sampled) in enumerate(zip(batch.seqs, batch.samples)):
            seq.drafts_in_flight -= len(batch.drafts_of(i))
            if sampled:
                seq.num_pending -= 1
                if not seq.finished:
                    rows.append((i, seq))
        return rows

    def append_token(self, seq: Sequence, token: int, logprob: float | None = None,
                     top: list[tuple[int, float]] | None = None,
                     stop_string: str | None = None, kept_draft: bool = False) -> None:
        """Add a sampled token; finish the sequence on a stop token, the end of its grammar,
        a stop string (found by the detokenizer) or max_tokens (validation keeps that
        within the context). ``kept_draft``: the token before it was a draft the target
        kept, so that token's K/V (written by the verify step) now count as computed."""
        if kept_draft and seq.status is Status.RUNNING:  # (not if preempted meanwhile)
            seq.num_computed += 1
        seq.output_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
            seq.output_top_logprobs.append(top or [])
        # A grammar the token completes (or that cannot go on) ends the output too.
        grammar_ended = seq.grammar is not None and (not seq.grammar.accept(token)
                                                     or seq.grammar.done)
        if token in seq.stop_ids:  # min_tokens already kept them from being sampled
            self.finish(seq, "stop", token)
        elif grammar_ended:
            self.finish(seq, "stop")
        elif stop_string is not None:
            self.finish(seq, "stop", stop_string)
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self.finish(seq, "length")

    def proposed(self, seq: Sequence, drafts: list[int], parents: list[int]) -> None:
        """EAGLE: the drafts (a tree: each one's parent) the head proposed in the step that
        just landed. Parents come before their children, so any first n are a tree."""
        seq.draft_tokens, seq.draft_parents = drafts, parents

    # -- pages -------------------------------------------------------------
    def _pages_needed(self, seq: Sequence, new_tokens: int) -> int:
        # A step in flight may keep all its drafts (the overlap schedule: spec_overlap.py).
        total = seq.num_computed + seq.drafts_in_flight + new_tokens
        if total >= seq.num_tokens:  # the row samples: EAGLE drafts past it
            total = min(total + self.cfg.draft_lookahead, self.cfg.context_length)
        return max(0, -(-total // self.cfg.page_size) - len(seq.pages))

    def _grow(self, seq: Sequence, new_tokens: int) -> bool:
        need = self._pages_needed(seq, new_tokens)
        if need > self.pool.num_free:
            self.cache.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            return False
        seq.pages += self.pool.alloc(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.pages)
        seq.pages, seq.num_computed, seq.draft_tokens, seq.draft_parents = [], 0, [], []
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- the decision --------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Every running decode, then prompt chunks up to the token budget."""
        decodes = self._schedule_decodes()
        budget = min(self.cfg.chunked_prefill_size, self.plan.max_tokens) - len(decodes)
        drafts = self._draft(decodes, budget) if self.speculating else [[] for _ in decodes]
        parents = [[] if seq.num_pending else seq.draft_parents[:len(d)]  # (the device's)
                   for seq, d in zip(decodes, drafts)]
        seqs, chunks = list(decodes), [1 + len(d) for d in drafts]
        budget -= sum(map(len, drafts))
        prefills = 0
        # Sequences already part-way through their prompt go first.
        for seq in list(self.running):
            if budget <= 0 or prefills >= self.cfg.max_prefill_seqs:
                break
            if seq.is_prefilling:
                n = min(seq.num_uncomputed, budget)
                if self._grow(seq, n):
                    seqs.append(seq)
                    chunks.append(n)
                    budget -= n
                    prefills += 1
        if self.cfg.schedule_policy == "lpm" and len(self.waiting) > 1:
            self.waiting = deque(sorted(self.waiting,
                                        key=lambda s: -self.cache.peek(s.cache_ids)))
        admitted = 0
        while (self.waiting and budget > 0 and admitted < self.cfg.new_seqs_per_prefill
               and prefills < self.cfg.max_prefill_seqs
               and len(self.running) < self.cfg.max_running_requests):
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a step in flight: back once its tokens land
            if not seq.pages:
                seq.pages, seq.num_computed = self.cache.match(seq.cache_ids)
                seq.num_cached_prompt = max(seq.num_cached_prompt, seq.num_computed)
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n):
                break  # wait for pages; a later step frees some
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            chunks.append(n)
            budget -= n
            admitted += 1
            prefills += 1
        if len(seqs) > len(decodes):
            self._fill_bucket(chunks, len(decodes))
        if not seqs:
            if len(self.running) > 1 and all(s.is_prefilling for s in self.running):
                # Partial prompts hold the pool between them and none can grow: the
                # newest gives its pages back so the others go on.
                self._preempt(self.running[-1])
                return self.schedule()
            return None
        return ScheduledBatch(seqs, chunks, num_decodes=len(decodes), drafts=drafts,
                              draft_parents=parents)

    def _draft(self, decodes: list[Sequence], budget: int) -> list[list[int]]:
        """Each decode's draft tokens, while the token budget and the pool allow. None for
        a sequence whose logits depend on every token before (penalties, a grammar), and
        none past its max_tokens. A sequence whose last step is still in flight (the
        overlap schedule, EAGLE only) verifies what the head proposes in that step: the
        device fills in the tokens (-1 here) and drops the drafts that the ones that step
        keeps leave no room for (engine/spec_overlap.py)."""
        started, drafts = time.perf_counter(), []
        for seq in decodes:
            room = min(budget, seq.draft_room)
            draft = []
            if room > 0 and seq.grammar is None and not seq.params.adjusts_logits:
                if seq.num_pending:
                    draft = [-1] * min(room, self.cfg.head_drafts)
                else:
                    draft = (self.drafter.propose(seq.all_ids, room) if self.drafter
                             else seq.draft_tokens[:room])
                if draft and not self._grow(seq, 1 + len(draft)):
                    draft = []  # the pool is short: decode the one token
            budget -= len(draft)
            drafts.append(draft)
        self.draft_seconds += time.perf_counter() - started
        return drafts

    def _fill_bucket(self, chunks: list[int], num_decodes: int) -> None:
        """Shorten the last prompt chunk so the step fills its token bucket instead of
        spilling just past one: 15 decodes beside a 256-token prompt would pad to 512
        tokens; 241 of the prompt's now, its last 15 in the next step. Steps of fewer than
        ``MIN_FILLED`` tokens are left as they are: reading the weights is their cost."""
        total = sum(chunks)
        buckets = [b for b in self.plan.token_buckets if b <= total]
        if not buckets or total in self.plan.token_buckets:
            return
        fill = buckets[-1]
        cut = min(total - fill, chunks[-1] - 1)
        if fill >= MIN_FILLED and fill > num_decodes and cut > 0:
            chunks[-1] -= cut

    def _schedule_decodes(self) -> list[Sequence]:
        """Running sequences past their prompt, each with a page for its next token; the
        newest running sequences are preempted while the pool is short."""
        decodes = [s for s in self.running if not s.is_prefilling and not s.length_done]
        for seq in list(decodes):
            if seq not in self.running:
                continue  # preempted below to make room
            while not self._grow(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim in decodes:
                    decodes.remove(victim)
                if victim is seq:
                    break
        return [s for s in decodes if s in self.running]
