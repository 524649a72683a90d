"""Property test of the radix tree and the page pool: no page is ever lost or shared wrongly."""

from hypothesis import given, settings, strategies as st

from sgljax.engine.kv_cache import OutOfPages, PagePool
from sgljax.engine.prefix_cache import RadixPrefixCache

PAGE = 2


def _tree_pages(cache):
    pages, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        pages.append(node.page)
        stack.extend(node.children.values())
    return pages


def _check(pool, cache, held):
    tree = _tree_pages(cache)
    assert len(tree) == len(set(tree)) == cache.num_pages  # each page in the tree once
    free = set(pool._free)
    assert len(free) == len(pool._free)
    assert not free & set(tree)  # never both free and cached
    for p in range(1, pool.num_pages):
        expected = tree.count(p) + sum(pages.count(p) for pages in held.values())
        assert pool.ref[p] == expected >= 0  # ref = owners: the tree plus requests holding it
        assert (p in free) == (expected == 0)  # a page nobody owns is on the free list


ops = st.lists(st.tuples(st.sampled_from(["start", "finish", "evict"]),
                         st.lists(st.integers(0, 2), min_size=1, max_size=9),
                         st.integers(0, 5)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(operations):
    pool = PagePool(12)
    cache = RadixPrefixCache(pool, PAGE)
    held: dict[int, list[int]] = {}  # running requests: id → pages they hold
    tokens: dict[int, list[int]] = {}
    for i, (op, toks, k) in enumerate(operations):
        if op == "start":  # match (lock the shared prefix), then allocate the rest
            pages, n = cache.match(toks)
            assert n % PAGE == 0 and n < len(toks)
            need = -(-len(toks) // PAGE) - len(pages)
            if need > pool.num_free:
                cache.evict(need - pool.num_free)
            try:
                pages += pool.alloc(need)
            except OutOfPages:
                pool.release(pages)
                continue
            held[i], tokens[i] = pages, toks
        elif op == "finish" and held:  # insert into the tree (unlock), release the request's refs
            rid = sorted(held)[k % len(held)]
            cache.insert(tokens[rid], held[rid])
            pool.release(held.pop(rid))
        elif op == "evict":
            cache.evict(k)
        _check(pool, cache, held)
    for rid in list(held):
        pool.release(held.pop(rid))
    cache.flush()
    assert pool.num_free == pool.capacity


def test_match_reuses_pages_and_lru_evicts_oldest():
    pool = PagePool(10)
    cache = RadixPrefixCache(pool, PAGE)
    a, b = [1, 2, 3, 4, 5], [7, 8, 9, 9, 1]
    for toks in (a, b):
        pages = pool.alloc(3)
        cache.insert(toks, pages)
        pool.release(pages)
    assert cache.num_pages == 4  # two full pages each; the half page is not cached
    pages, n = cache.match(a + [6])
    assert n == 4 and len(pages) == 2
    pool.release(pages)
    assert cache.evict(2) == 2  # b was used least recently: its two pages go first
    assert cache.peek(b + [0]) == 0 and cache.peek(a + [6]) == 4
