"""Prefix sharing over the paged KV pool: a tree of full pages keyed by their tokens.

Each node is one full page of ``page_size`` tokens whose K/V were computed
after the tokens of its ancestors. The tree holds one pool reference to every
page it stores; a running sequence that matched a prefix holds another. A
leaf whose only reference is the tree's can be evicted (least recently used
first), which returns its page to the pool.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

from sgljax.engine.kv_cache import PagePool

_clock = itertools.count()


class PrefixCache(Protocol):
    def match(self, token_ids: list[int]) -> tuple[list[int], int]: ...
    def peek(self, token_ids: list[int]) -> int: ...
    def insert(self, token_ids: list[int], pages: list[int]) -> None: ...
    def evict(self, num_pages: int) -> int: ...
    def flush(self) -> None: ...
    def hit_rate(self) -> float: ...


class NoPrefixCache:
    """``--disable-radix-cache``: every prompt is computed from scratch."""

    num_pages = 0

    def match(self, token_ids):
        return [], 0

    def peek(self, token_ids):
        return 0

    def insert(self, token_ids, pages):
        pass

    def evict(self, num_pages):
        return 0

    def flush(self):
        pass

    def hit_rate(self):
        return 0.0


class _Node:
    __slots__ = ("key", "page", "parent", "children", "last_used")

    def __init__(self, key, page, parent):
        self.key, self.page, self.parent = key, page, parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_used = next(_clock)


class RadixPrefixCache:
    def __init__(self, pool: PagePool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self.root = _Node((), -1, None)
        self.num_pages = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    def _keys(self, token_ids: list[int], max_pages: int):
        ps = self.page_size
        for i in range(min(len(token_ids) // ps, max_pages)):
            yield tuple(token_ids[i * ps:(i + 1) * ps])

    def _walk(self, token_ids: list[int]) -> list[_Node]:
        # Keep at least one token uncomputed: the step needs it to produce logits.
        usable = (len(token_ids) - 1) // self.page_size
        node, path = self.root, []
        for key in self._keys(token_ids, usable):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def peek(self, token_ids: list[int]) -> int:
        return len(self._walk(token_ids)) * self.page_size

    def match(self, token_ids: list[int]) -> tuple[list[int], int]:
        path = self._walk(token_ids)
        stamp = next(_clock)
        for node in path:
            node.last_used = stamp
        pages = [n.page for n in path]
        self.pool.retain(pages)
        self.query_tokens += len(token_ids)
        self.hit_tokens += len(pages) * self.page_size
        return pages, len(pages) * self.page_size

    def insert(self, token_ids: list[int], pages: list[int]) -> None:
        node, stamp = self.root, next(_clock)
        for key, page in zip(self._keys(token_ids, len(pages)), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(key, page, node)
                node.children[key] = child
                self.pool.retain([page])
                self.num_pages += 1
            child.last_used = stamp
            node = child

    def _evictable_leaves(self) -> list[tuple[int, int, _Node]]:
        heap, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and self.pool.ref[node.page] == 1:
                heap.append((node.last_used, id(node), node))
        heapq.heapify(heap)
        return heap

    def _remove(self, node: _Node) -> None:
        del node.parent.children[node.key]
        self.pool.release([node.page])
        self.num_pages -= 1

    def evict(self, num_pages: int) -> int:
        heap, freed = self._evictable_leaves(), 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            self._remove(node)
            freed += 1
            parent = node.parent
            if parent is not self.root and not parent.children and self.pool.ref[parent.page] == 1:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def flush(self) -> None:
        self.evict(self.num_pages)

    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
