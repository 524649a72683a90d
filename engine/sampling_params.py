"""What a request asks for, and the one place its limits are checked.

JAX-free: the HTTP adapters build and validate these in worker threads, and
``Engine.add_request`` validates the same way, so a request is refused with the
same message whichever door it came in by, and never silently changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sgljax.engine.constraint import Constraint

MAX_TOP_LOGPROBS = 20  # the sampler returns the top 20
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: bias values in [-100, 100]


class RequestError(ValueError):
    """A request the engine cannot serve as asked. ``param`` names the field at fault
    (as SamplingParams spells it, or "prompt"); ``code`` is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestLimits:
    context_length: int  # prompt + generated tokens, at most
    vocab_size: int


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
    # The output must match it (engine/grammar.py checks that it compiles).
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties, logit_bias or min_tokens: the host folds them into the logits."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1 or self.logit_bias or self.min_tokens)

    def validate(self, limits: RequestLimits, prompt_ids: list[int]) -> "SamplingParams":
        """Raise RequestError for anything out of range; returns self."""
        _check_prompt(prompt_ids, limits)
        checks = [
            (self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature", "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (-1 <= self.top_k < 2 ** 31, "top_k", "top_k must be -1, 0 or positive (below 2**31)"),
            (0 <= self.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty",
             "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "frequency_penalty must be in [-2, 2]"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
             f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             f"min_tokens ({self.min_tokens}) must be in [0, max_tokens ({self.max_tokens})]"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise RequestError(message, param)
        _check_ids(self.stop_token_ids, limits.vocab_size, "stop_token_ids")
        _check_ids(list(self.logit_bias), limits.vocab_size, "logit_bias")
        for tok, value in self.logit_bias.items():
            if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise RequestError(f"logit_bias value {value} for token {tok} is outside "
                                   f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]", "logit_bias")
        ctx, n = limits.context_length, len(prompt_ids)
        if n + self.max_tokens > ctx:
            raise RequestError(f"This model's maximum context length is {ctx} tokens; you "
                               f"asked for {n + self.max_tokens} ({n} in the prompt, "
                               f"{self.max_tokens} to generate)", "max_tokens",
                               "context_length_exceeded")
        return self


def _check_prompt(prompt_ids: list[int], limits: RequestLimits) -> None:
    if not prompt_ids:
        raise RequestError("the prompt is empty", "prompt")
    _check_ids(prompt_ids, limits.vocab_size, "prompt")
    ctx = limits.context_length
    if len(prompt_ids) >= ctx:
        raise RequestError(f"This model's maximum context length is {ctx} tokens; the prompt "
                           f"has {len(prompt_ids)} tokens", "max_tokens",
                           "context_length_exceeded")


def _check_ids(ids, vocab: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= int(t) < vocab), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param)


def tokens_left(prompt_ids: list[int], limits: RequestLimits) -> int:
    """The largest max_tokens this prompt allows (a request that does not say how many)."""
    _check_prompt(prompt_ids, limits)
    return limits.context_length - len(prompt_ids)
