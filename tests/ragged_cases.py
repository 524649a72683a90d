"""Random ragged attention cases and a dense numpy answer, for every backend's tests.

A case is a flat batch of query tokens over a shuffled paged cache: decode tokens
(one query each), prefill chunks (with or without a cached prefix), in any order,
plus padding sequences and padding tokens past the last real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RaggedCase:
    q: np.ndarray  # (T, H, D)
    k_cache: np.ndarray  # (L, num_pages, KV, page_size, D)
    v_cache: np.ndarray
    layer: int
    page_table: np.ndarray  # (S, P)
    cu_q_lens: np.ndarray  # (S + 1,)
    kv_lens: np.ndarray  # (S,)
    num_seqs: int
    q_lens: list[int]
    tree_bits: np.ndarray | None = None  # (T,) int32: token trees (kernels/paged_attention.py)

    def args(self, dtype=np.float32):
        """Positional arguments of the ragged attention contract (numpy)."""
        return (self.q.astype(dtype), self.k_cache.astype(dtype), self.v_cache.astype(dtype),
                np.int32(self.layer), self.page_table, self.cu_q_lens, self.kv_lens,
                np.int32(self.num_seqs))

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[self.num_seqs])


def make_case(rng, kv_lens: list[int], q_lens: list[int], *, page_size: int = 4,
              kv_heads: int = 2, group: int = 3, dim: int = 8, layers: int = 2,
              pad_seqs: int = 1, pad_tokens: int = 3, pages_per_seq: int | None = None,
              layer: int = 1) -> RaggedCase:
    """Sequence i has kv_lens[i] cached tokens, the last q_lens[i] of them queried."""
    assert all(0 < n <= kv for n, kv in zip(q_lens, kv_lens))
    S = len(kv_lens) + pad_seqs
    P = pages_per_seq or max(-(-kv // page_size) for kv in kv_lens) + 1
    num_pages = 1 + S * P
    shape = (layers, num_pages, kv_heads, page_size, dim)
    k_cache = rng.standard_normal(shape).astype(np.float32)
    v_cache = rng.standard_normal(shape).astype(np.float32)
    table = rng.permutation(np.arange(1, num_pages)).reshape(S, P).astype(np.int32)
    table[len(kv_lens):] = 0  # padding sequences point at the sink page
    T = sum(q_lens) + pad_tokens
    cu = np.zeros(S + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    kvl = np.zeros(S, np.int32)
    kvl[:len(kv_lens)] = kv_lens
    q = rng.standard_normal((T, kv_heads * group, dim)).astype(np.float32)
    return RaggedCase(q, k_cache, v_cache, layer, table, cu, kvl, len(kv_lens), list(q_lens))


def dense_answer(case: RaggedCase, sliding_window: int | None = None) -> np.ndarray:
    """(T, H, D) float64 softmax attention, one query at a time; padding tokens zero."""
    q, kc, vc = (x.astype(np.float64) for x in (case.q, case.k_cache, case.v_cache))
    T, H, D = q.shape
    kvh = kc.shape[2]
    out = np.zeros((T, H, D))
    for s in range(case.num_seqs):
        def tokens(cache):  # this sequence's (K, H, D), kv heads repeated for the group
            pages = cache[case.layer, case.page_table[s]].transpose(0, 2, 1, 3).reshape(-1, kvh, D)
            return np.repeat(pages[: case.kv_lens[s]], H // kvh, axis=1)

        k, v = tokens(kc), tokens(vc)
        start, n = case.cu_q_lens[s], case.q_lens[s]
        for j in range(n):
            pos = case.kv_lens[s] - n + j
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            keys = np.arange(lo, pos + 1)
            if case.tree_bits is not None:  # the 31 keys before: only where a bit is set
                back = pos - keys
                bits = int(case.tree_bits[start + j]) & 0xFFFFFFFF
                keys = keys[(back >= 32) | ((bits >> np.minimum(back, 31)) & 1 == 1)]
            sc = np.einsum("hd,thd->ht", q[start + j], k[keys]) / np.sqrt(D)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            out[start + j] = np.einsum("ht,thd->hd", p / p.sum(-1, keepdims=True), v[keys])
    return out


def random_case(rng, *, page_size: int, group: int, kind: str, max_seqs: int = 5,
                max_len: int = 40, **kw) -> RaggedCase:
    """kind: decode (one query each), prefill (whole prompts, some with a cached prefix)
    or mixed (both, shuffled)."""
    n = int(rng.integers(1, max_seqs + 1))
    kv = [int(rng.integers(1, max_len + 1)) for _ in range(n)]
    if kind == "decode":
        ql = [1] * n
    elif kind == "prefill":
        ql = [k if rng.random() < 0.5 else int(rng.integers(1, k + 1)) for k in kv]
    else:
        ql = [1 if rng.random() < 0.5 else int(rng.integers(1, k + 1)) for k in kv]
    return make_case(rng, kv, ql, page_size=page_size, group=group, **kw)


def tree_case(rng, *, page_size: int, group: int, dim: int = 8, kv_heads: int = 2,
              **kw) -> RaggedCase:
    """Verify rows of random token trees (1 to 32 nodes, some past 32 cached tokens, on
    and off page edges) beside decode tokens and a prompt chunk; tree_bits set."""
    from sgljax.kernels.paged_attention import tree_bits_of
    nodes = [int(rng.integers(1, 33)) for _ in range(3)] + [32]
    kv = [n + int(rng.integers(0, 50)) for n in nodes] + [int(rng.integers(1, 40)), 45]
    ql = nodes + [1, 20]
    case = make_case(rng, kv, ql, page_size=page_size, group=group, dim=dim,
                     kv_heads=kv_heads, **kw)
    bits = np.full(case.q.shape[0], -1, np.int32)
    for s, n in enumerate(nodes):
        parents = [int(rng.integers(0, j + 1)) for j in range(n - 1)]
        bits[case.cu_q_lens[s]:case.cu_q_lens[s] + n] = tree_bits_of(parents)
    case.tree_bits = bits
    return case
