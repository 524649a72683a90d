"""What the engine hands back: per-step outputs, their accumulation, and its state.

``RequestOutput`` is a copy (no reference into the scheduler's sequences), so the
server's threads may read it while the engine goes on changing its state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sgljax.engine.batch import ScheduledBatch


@dataclass
class RequestOutput:
    """What one step produced for one request (or why it ended without output)."""

    rid: str
    text: str  # the new text (never splits a character; stop strings cut)
    token_ids: list[int]  # the new tokens
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    matched_stop: int | str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, in all
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    error: str | None = None  # the engine refused or failed this request
    error_status: int = 400  # HTTP status for ``error``: 400 refused, 503 shutting down, 500

    @classmethod
    def failed(cls, rid: str, error: str, status: int) -> "RequestOutput":
        return cls(rid, "", [], True, "abort", error=error, error_status=status)


@dataclass
class Completion:
    """Everything a request has produced so far: the sum of its RequestOutputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, o: RequestOutput) -> None:
        self.text += o.text
        self.token_ids += o.token_ids
        self.logprobs += o.logprobs
        self.top_logprobs += o.top_logprobs
        self.prompt_tokens = o.prompt_tokens or self.prompt_tokens
        self.completion_tokens = o.completion_tokens or self.completion_tokens
        self.cached_tokens = max(self.cached_tokens, o.cached_tokens)
        if o.finished:
            self.finish_reason = o.finish_reason
            self.matched_stop = o.matched_stop


@dataclass(frozen=True)
class EngineStats:
    """The engine's state in numbers (``Engine.stats``): /metrics, /get_server_info, health."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 1
    kv_pages_held_by_requests: int = 0
    prefix_cache_pages: int = 0
    cache_hit_rate: float = 0.0
    compiles_after_warmup: int = 0  # executables built while serving: should stay 0
    healthy: bool = True  # False once a host of a multi-host engine is lost
    # Speech models: clips encoded, encoder calls that encoded them (clips > calls: batched),
    # and encoder shapes first compiled while serving (should stay 0).
    audio_clips_encoded: int = 0
    audio_encoder_calls: int = 0
    unwarmed_audio_shapes: int = 0
    # Speculative decoding: decode rows that verified drafts, draft tokens proposed and
    # kept, seconds proposing them (NGRAM: host lookups; EAGLE: the wait for the draft
    # head after each step), seconds of the steps that verified them.
    spec_verify_rows: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_draft_seconds: float = 0.0
    spec_verify_seconds: float = 0.0

    @property
    def spec_accept_length(self) -> float:
        """Tokens a decode row with drafts emits on average (1 + drafts kept; 0: none)."""
        if not self.spec_verify_rows:
            return 0.0
        return 1 + self.spec_accepted_tokens / self.spec_verify_rows

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / max(self.kv_pages_total, 1)


@dataclass
class SpecStats:
    """Speculative decoding so far: rows that verified drafts, drafts, drafts kept, and
    the time of the steps that verified them."""
    verify_rows: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_seconds: float = 0.0
    head_seconds: float = 0.0  # EAGLE: waited for the draft head after the steps

    def landed(self, sched: "ScheduledBatch", out, seconds: float) -> None:
        rows = [i for i, d in enumerate(sched.drafts) if d]
        self.verify_rows += len(rows)
        self.draft_tokens += sum(len(sched.drafts[i]) for i in rows)
        self.accepted_tokens += int(sum(out.accepted[i] for i in rows))
        self.verify_seconds += seconds
