"""Shape buckets: every device step is padded to one of a few shapes.

A step's shape is (sequences S, query tokens Q, pages per sequence P). Decode
steps have Q = 1; prefill steps have Q from the token paddings. P is always
the context length's page count: attention stops at the longest sequence's
last page (kernels/paged_attention.py), so a longer table costs nothing and
one P serves every length. Warmup compiles every bucket, so a running server
never meets a new shape.
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


def pick(buckets: list[int], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclass(frozen=True)
class BucketPlan:
    decode_batch: tuple[int, ...]  # S for decode steps
    prefill_batch: tuple[int, ...]  # S for prefill steps
    prefill_tokens: tuple[int, ...]  # Q for prefill steps
    pages: int  # P: pages per sequence in every step's page table
    page_size: int = 16

    @classmethod
    def plan(cls, *, max_running: int, max_prefill_seqs: int, chunked_prefill_size: int,
             max_pages_per_seq: int, page_size: int, bs_paddings: list[int] | None = None,
             token_paddings: list[int] | None = None) -> "BucketPlan":
        decode = sorted(set(bs_paddings)) if bs_paddings else powers_of_two(1, max_running)
        if decode[-1] < max_running:
            raise ValueError(f"--precompile-bs-paddings must reach --max-running-requests "
                             f"({max_running}); the largest is {decode[-1]}")
        tokens = (sorted(set(token_paddings)) if token_paddings
                  else powers_of_two(min(32, chunked_prefill_size), chunked_prefill_size))
        return cls(
            decode_batch=tuple(decode),
            prefill_batch=tuple(powers_of_two(1, max_prefill_seqs)),
            prefill_tokens=tuple(tokens),
            pages=max_pages_per_seq,
            page_size=page_size,
        )

    @property
    def prefill_area(self) -> int:
        """Largest S x Q of a prefill step: the chunked-prefill token budget."""
        return max(self.prefill_tokens)

    def prefill_fits(self, num_seqs: int, max_chunk: int) -> bool:
        if num_seqs > max(self.prefill_batch) or max_chunk > max(self.prefill_tokens):
            return False
        S, Q = pick(list(self.prefill_batch), num_seqs), pick(list(self.prefill_tokens), max_chunk)
        return S * Q <= self.prefill_area

    def shape_for(self, is_prefill: bool, num_seqs: int, max_tokens: int, max_pages: int):
        if max_pages > self.pages:
            raise ValueError(f"{max_pages} pages exceed the context's {self.pages}")
        if is_prefill:
            return (pick(list(self.prefill_batch), num_seqs),
                    pick(list(self.prefill_tokens), max_tokens), self.pages)
        return pick(list(self.decode_batch), num_seqs), 1, self.pages

    def all_shapes(self) -> list[tuple[bool, int, int, int]]:
        shapes = [(False, s, 1, self.pages) for s in self.decode_batch]
        shapes += [(True, s, q, self.pages) for s in self.prefill_batch
                   for q in self.prefill_tokens if s * q <= self.prefill_area]
        return shapes

    def describe(self) -> str:
        return (f"decode batch {list(self.decode_batch)}, prefill batch "
                f"{list(self.prefill_batch)} x tokens {list(self.prefill_tokens)}, "
                f"{self.pages} pages/seq; {len(self.all_shapes())} shapes")


def new_seqs_per_prefill(args: "EngineArgs", on_cpu: bool) -> int:
    """New prompts one prefill step takes: ``--new-seqs-per-prefill``, else 1 on CPU
    (where a prefill step is long next to a decode step), else ``--max-prefill-seqs``."""
    return args.new_seqs_per_prefill or (1 if on_cpu else args.max_prefill_seqs)


def plan_buckets(args: "EngineArgs", context_length: int, on_cpu: bool) -> BucketPlan:
    """The buckets an engine with these settings compiles; ``context_length`` is the
    engine's (``--context-length`` capped at the model's). Pure: ``warmup`` and
    ``serve`` plan the same shapes from the same settings."""
    # A prefill step holds its new prompts and at most one part-way through its chunks.
    new_per_prefill = new_seqs_per_prefill(args, on_cpu)
    return BucketPlan.plan(
        max_running=args.max_running_requests,
        max_prefill_seqs=min(args.max_prefill_seqs, new_per_prefill + 1),
        chunked_prefill_size=args.chunked_prefill_size,
        max_pages_per_seq=-(-context_length // args.page_size),
        page_size=args.page_size, bs_paddings=args.precompile_bs_paddings,
        token_paddings=args.precompile_token_paddings)
