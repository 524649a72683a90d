"""Shape buckets: every device step is padded to one of a few shapes.

A ragged step's shape is (tokens T, sequences S, pages per sequence P). T comes
from the token buckets: the decode batch sizes (a step of n decodes has n
tokens) and the prefill token paddings up to the chunked-prefill budget. S is a
function of T (``seqs_for``): T itself while T is a decode batch size, the
largest decode batch above that, so every T has one shape and a step with more
tokens than sequences never needs a second one. Rows of padding sequences cost
an LM-head row each and nothing in attention (the kernels stop at
``num_seqs``). P is always the context length's page count: attention stops at
each sequence's last page (kernels/paged_attention.py), so a longer table costs
nothing and one P serves every length. Warmup compiles every bucket, so a
running server never meets a new shape.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sgljax.engine.args import EngineArgs


def powers_of_two(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return sorted(set(out))


def pick(buckets: list[int] | tuple[int, ...], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclass(frozen=True)
class BucketPlan:
    token_buckets: tuple[int, ...]  # T: tokens in one step
    seq_buckets: tuple[int, ...]  # S: the decode batch sizes
    pages: int  # P: pages per sequence in every step's page table
    page_size: int = 16

    @classmethod
    def plan(cls, *, max_running: int, chunked_prefill_size: int, max_pages_per_seq: int,
             page_size: int, bs_paddings: list[int] | None = None,
             token_paddings: list[int] | None = None) -> "BucketPlan":
        seqs = sorted(set(bs_paddings)) if bs_paddings else powers_of_two(1, max_running)
        if seqs[-1] < max_running:
            raise ValueError(f"--precompile-bs-paddings must reach --max-running-requests "
                             f"({max_running}); the largest is {seqs[-1]}")
        prefill = (sorted(set(token_paddings)) if token_paddings
                   else powers_of_two(min(32, chunked_prefill_size), chunked_prefill_size))
        return cls(token_buckets=tuple(sorted(set(seqs) | set(prefill))),
                   seq_buckets=tuple(seqs), pages=max_pages_per_seq, page_size=page_size)

    @property
    def max_tokens(self) -> int:
        """The most tokens one step holds."""
        return self.token_buckets[-1]

    @property
    def max_seqs(self) -> int:
        return self.seq_buckets[-1]

    def seqs_for(self, T: int) -> int:
        """The sequence rows of a step of T tokens."""
        return pick(self.seq_buckets, min(T, self.max_seqs))

    def shape_for(self, num_tokens: int, num_seqs: int, max_pages: int) -> tuple[int, int, int]:
        if max_pages > self.pages:
            raise ValueError(f"{max_pages} pages exceed the context's {self.pages}")
        if num_seqs > self.max_seqs:
            raise ValueError(f"{num_seqs} sequences exceed the largest bucket {self.max_seqs}")
        T = pick(self.token_buckets, max(num_tokens, num_seqs))
        return T, self.seqs_for(T), self.pages

    def all_shapes(self) -> list[tuple[int, int, int]]:
        return [(T, self.seqs_for(T), self.pages) for T in self.token_buckets]

    def describe(self) -> str:
        return (f"tokens {list(self.token_buckets)} (sequences "
                f"{[self.seqs_for(T) for T in self.token_buckets]}), {self.pages} pages/seq; "
                f"{len(self.all_shapes())} shapes")


def new_seqs_per_prefill(args: "EngineArgs", on_cpu: bool) -> int:
    """New prompts one step takes: ``--new-seqs-per-prefill``, else 1 on CPU (where a
    prompt chunk is long next to a decode token), else ``--max-prefill-seqs``."""
    return args.new_seqs_per_prefill or (1 if on_cpu else args.max_prefill_seqs)


def plan_buckets(args: "EngineArgs", context_length: int) -> BucketPlan:
    """The buckets an engine with these settings compiles; ``context_length`` is the
    engine's (``--context-length`` capped at the model's). Pure: ``warmup`` and
    ``serve`` plan the same shapes from the same settings."""
    return BucketPlan.plan(
        max_running=args.max_running_requests, chunked_prefill_size=args.chunked_prefill_size,
        max_pages_per_seq=-(-context_length // args.page_size), page_size=args.page_size,
        bs_paddings=args.precompile_bs_paddings, token_paddings=args.precompile_token_paddings)
