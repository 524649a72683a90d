"""A request's life inside the engine: its tokens, pages and progress."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from sgljax.engine.grammar import GrammarState
from sgljax.engine.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    rid: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache (or being written by a step in flight)
    num_pending: int = 0  # tokens sampled by a step still in flight: counted, not yet known
    drafts_in_flight: int = 0  # drafts steps in flight verify: any number of them may be kept
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | str | None = None
    num_preemptions: int = 0
    grammar: GrammarState | None = None  # constrained decoding: where its output stands
    # EAGLE: the drafts the head proposed after the sequence's last step, for its next one.
    draft_tokens: list[int] = field(default_factory=list)
    draft_parents: list[int] = field(default_factory=list)  # their tree (engine/speculative.py)
    # Audio prompts (Qwen3-ASR): the clips' features until encoded, then the encoder's
    # outputs (n, D) for the prompt's <|audio_pad|> positions (n,), kept across
    # preemption so a preempted request is never encoded again; and the prompt ids the
    # prefix cache keys on, where each clip's placeholders carry an id of its own.
    audio_clips: list[Any] | None = None
    audio_embeds: Any = None
    audio_positions: Any = None
    audio_cache_ids: list[int] | None = None

    @property
    def cache_ids(self) -> list[int]:
        """What the prefix cache matches: ``all_ids``, with audio placeholders told apart by
        their clip (the same placeholder ids stand for any audio)."""
        if self.audio_cache_ids is None:
            return self.all_ids
        return self.audio_cache_ids + self.output_ids

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        """Output tokens so far, counting the ones a step in flight is sampling."""
        return len(self.output_ids) + self.num_pending

    @property
    def length_done(self) -> bool:
        """It will have max_tokens once the step in flight lands: schedule it no more."""
        return self.num_generated >= self.params.max_tokens

    @property
    def draft_room(self) -> int:
        """Drafts its next step may verify without passing max_tokens (if the step in
        flight keeps none of its own)."""
        return self.params.max_tokens - self.num_generated - 1

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        """More than the one newest token still needs its K/V computed."""
        return self.num_uncomputed > 1 or not self.num_generated

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, matched=None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.matched_stop = matched
