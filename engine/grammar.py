"""Constrained decoding: a request's grammar, its matcher, and the token masks of a step.

llguidance compiles JSON schemas, regular expressions and Lark/GBNF grammars into an
Earley parser over the tokenizer's byte strings; a matcher per sequence walks the
tokens it has generated and writes, for the next token, one bit per vocabulary id
into a packed int32 row. The rows of a step go to the device as they are (V/32
words per sequence, not V floats) and the sampler unpacks them there
(engine/sampling.py).

Why llguidance: xgrammar's package requires torch and triton (the serving venv has
neither); outlines-core turns a schema into a regex and indexes it against the whole
vocabulary before the first token, and has no recursive schemas. llguidance needs
neither torch nor precomputation (a schema compiles in about a millisecond), fills a
151k-token mask in about 0.2 ms, and writes the packed layout the device takes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from sgljax.engine.constraint import Constraint
from sgljax.engine.sampling_params import RequestError

log = logging.getLogger(__name__)
CACHED_GRAMMARS = 256


class GrammarCompiler:
    """Builds matchers against one tokenizer. The tokenizer's conversion takes about a
    second, so it happens on first use, once per engine; each sequence gets its own copy
    of its grammar's compiled matcher."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: list[int]):
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._tokenizer = None
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                           eos_token=self._eos or None)
        return self._tokenizer

    def check(self, constraint: Constraint) -> None:
        """RequestError naming the field when the constraint does not compile. The HTTP
        adapters call it in their worker threads, so the compiled grammar is ready (and
        ``matcher`` only copies it) when the request reaches the engine thread."""
        self._compiled(constraint)

    def matcher(self, constraint: Constraint) -> "GrammarState":
        return GrammarState(self._compiled(constraint).deep_copy())

    def _compiled(self, constraint: Constraint):
        """A fresh matcher for ``constraint``, compiled once and kept (the last
        ``CACHED_GRAMMARS``): n choices and repeated schemas share the compilation."""
        from llguidance import LLMatcher

        with self._lock:  # worker threads and the engine thread share the cache
            matcher = self._cache.get(constraint)
            if matcher is not None:
                self._cache.move_to_end(constraint)
                return matcher
        try:
            grammar = constraint.grammar()
        except Exception as e:  # noqa: BLE001 (gbnf_to_lark raises bare Exceptions)
            raise RequestError(f"invalid {constraint.kind}: {e}", constraint.param) from None
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            first = matcher.get_error().strip().splitlines()[0]
            raise RequestError(f"invalid {constraint.kind}: {first}", constraint.param)
        with self._lock:
            self._cache[constraint] = matcher
            if len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return matcher


class GrammarState:
    """One sequence's position in its grammar (owned by the sequence, advanced by the
    scheduler as tokens land)."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar cannot continue past it."""
        ok = self.matcher.consume_token(token)
        if not ok:
            log.warning("constrained sequence left its grammar: %s", self.matcher.get_error())
        return ok

    @property
    def done(self) -> bool:
        """Nothing but end-of-sequence may follow (or the matcher failed)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into ``row`` (int32, one bit per token id)."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def fill_masks(states: list["GrammarState | None"], rows: int, vocab_size: int) -> np.ndarray:
    """(rows, V/32) int32 bitmask; rows without a grammar (and padding) allow everything."""
    bits = np.full((rows, mask_words(vocab_size)), -1, np.int32)
    for i, state in enumerate(states):
        if state is not None:
            state.fill(bits[i])
    return bits
