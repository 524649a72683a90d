"""NGRAM speculative decoding's drafter: draft tokens looked up in the request itself.

Prompt lookup (vLLM's ``ngram``, SGLang's ``NGRAM``): when the last n tokens of a
sequence occurred earlier in its prompt or output, the tokens that followed them
then are a guess at what follows now. No draft model, no weights: rewriting,
editing and code, where the output copies its input, accept most drafts. The
longest match wins (n from ``max_window`` down to ``min_window``), and of equal
matches the most recent one.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LOOKBACK = 4096  # tokens searched at most: the cost of a lookup stays bounded


class NgramDrafter:
    def __init__(self, num_draft_tokens: int, min_window: int = 1, max_window: int = 4):
        if not 1 <= min_window <= max_window:
            raise ValueError(f"ngram windows need 1 <= min <= max, not {min_window}, {max_window}")
        self.num_draft_tokens = num_draft_tokens
        self.min_window, self.max_window = min_window, max_window

    def propose(self, ids: list[int], limit: int | None = None) -> list[int]:
        """Up to ``min(num_draft_tokens, limit)`` tokens that may follow ``ids``."""
        k = self.num_draft_tokens if limit is None else min(self.num_draft_tokens, limit)
        if k <= 0 or len(ids) < self.min_window + 1:
            return []
        seq = np.asarray(ids[-LOOKBACK:], np.int64)
        for n in range(min(self.max_window, len(seq) - 1), self.min_window - 1, -1):
            tail = seq[-n:]
            # Windows that end before the tail's own last token, so a token follows each.
            windows = sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent match
                return seq[start:start + k].tolist()
        return []
