"""The paged KV cache: device arrays of pages and the page allocator.

Page 0 is never handed out: padded tokens of a step write their K/V there, so
padding never needs a branch on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for."""


class PagePool:
    """Free list of KV pages with reference counts (shared prefixes hold pages twice)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the KV pool needs at least 2 pages")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self.ref = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.ref[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for p in pages:
            assert self.ref[p] > 0, f"retain of free page {p}"
            self.ref[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            assert self.ref[p] > 0, f"double free of page {p}"
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self._free.append(p)


@dataclass
class KVCacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: object = jnp.float32

    @property
    def shape(self) -> tuple[int, ...]:
        # Head-major inside a page: see kernels/paged_attention.py.
        return (self.num_layers, self.num_pages, self.kv_heads, self.page_size, self.head_dim)

    def bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.page_size * self.kv_heads * self.head_dim * jnp.dtype(
            self.dtype).itemsize

    def allocate(self, mesh, split_heads: bool = True) -> tuple[jax.Array, jax.Array]:
        """Zeroed K and V caches, split over the mesh's ``tp`` axis by KV head (or, not
        ``split_heads``, whole on every device)."""
        sharding = NamedSharding(mesh, P(None, None, "tp", None, None) if split_heads else P())
        make = jax.jit(lambda: jnp.zeros(self.shape, self.dtype), out_shardings=sharding)
        return make(), make()
