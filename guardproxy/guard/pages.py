"""KV page ids and the prefix cache: pure bookkeeping, no tensors (the scheduler's Allocator).

The KV cache is a pool of ``PAGE_SIZE``-position pages; a stream owns a list of them (``KVPages``). The
tensors live with the model (``ModelRunner``, here or in the guard's own process); this module only
decides which page ids hold what, so it can live beside the scheduler.

Prefix caching (the idea of vLLM's automatic prefix caching): a full page is identified by the token ids
it holds and every id before it, as a chained digest (``page_keys``), so two streams whose ids agree up to
the end of a page have the same KV there and can share it. Pages are reference counted. A page in the
cache is immutable: a stream that must write into a page that is cached or shared first gets a page of
its own (``prepare_write``: copy-on-write, the kept positions copied by the runner). A cached page no
live stream holds waits in least-recently-used order, and is evicted when fresh pages run out (the cache
never takes room from live streams) or when more than ``cache_pages`` are waiting. The cache belongs to
one engine and its model: another model, dtype or device never shares it, and a guard process that dies
takes the cache with it (``clear_cache``).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

PAGE_SIZE = 16  # positions a page; the scheduler reserves capacity in multiples of 16 too
_ROOT = b"guardproxy-kv-pages"


def page_keys(ids: Sequence[int], parent: bytes | None = None, first: int = 0) -> list[bytes]:
    """The keys of the full pages of ``ids`` from page ``first`` on, each a digest of its ids and the
    key of the page before (``parent``: the key of page ``first - 1``)."""
    keys: list[bytes] = []
    key = _ROOT if parent is None else parent
    for p in range(first, len(ids) // PAGE_SIZE):
        chunk = ids[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        key = hashlib.blake2b(key + b"".join(i.to_bytes(4, "little") for i in chunk), digest_size=16).digest()
        keys.append(key)
    return keys


@dataclass(eq=False)
class KVPages:
    """One stream's cache: the pool pages holding its positions, in order (``PAGE_SIZE`` each).
    ``first`` is the first page when they are one run (attention then reads them in place), else -1."""

    pages: list[int]
    capacity: int
    first: int = -1

    def __post_init__(self) -> None:
        self.check_run()

    def snapshot(self) -> KVPages:
        """A copy for a step in flight, which must not see the page table change under it."""
        return KVPages(list(self.pages), self.capacity, self.first)

    def check_run(self) -> None:
        p = self.pages
        self.first = p[0] if p and p == list(range(p[0], p[0] + len(p))) else -1


class PagePool:
    """Hands out KV page ids, shares cached ones. ``max_pages``: fresh pages past this are taken only
    when nothing is free or evictable; ``cache_pages``: cached pages kept while no stream holds them
    (0: no prefix cache)."""

    def __init__(self, max_pages: int | None = None, cache_pages: int = 0) -> None:
        self.max_pages = max_pages
        self.cache_pages = cache_pages
        self._free: list[int] = []  # page ids held by nobody and cached for nobody, sorted
        self._pages = 0  # ids ever handed out
        self._refs: dict[int, int] = {}  # pages held by streams: how many
        self._key_of: dict[int, bytes] = {}  # cached pages: their key
        self._page_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody holds, oldest first
        self.evictions = 0

    @property
    def cached_pages(self) -> int:
        return len(self._key_of)

    # -- taking pages ---------------------------------------------------------------------------------

    def _is_free(self, page: int) -> bool:
        if page >= self._pages:
            return self.max_pages is None or page < self.max_pages
        i = bisect.bisect_left(self._free, page)
        return i < len(self._free) and self._free[i] == page

    def _claim(self, first: int, n: int) -> list[int] | None:
        """Pages ``first..first+n`` if all are free (released, or fresh within ``max_pages``)."""
        if not all(self._is_free(p) for p in range(first, first + n)):
            return None
        lo = bisect.bisect_left(self._free, first)
        hi = bisect.bisect_left(self._free, first + n)
        del self._free[lo:hi]
        self._pages = max(self._pages, first + n)
        return list(range(first, first + n))

    def _evict(self, page: int, *, counted: bool = True) -> None:
        del self._idle[page]
        del self._page_of[self._key_of.pop(page)]
        bisect.insort(self._free, page)
        self.evictions += counted

    def _take(self, n: int, after: int | None = None) -> list[int]:
        """``n`` pages of the stream's own, as one run where possible (attention then reads a stream in
        place): right after page ``after`` (a stream growing), else the first free run, else fresh at
        the end; with too few of those, idle cached pages are evicted, oldest first (the scheduler never
        reserves more positions than the pool may hold, so the live streams always fit)."""
        if n <= 0:
            return []
        fresh_left = math.inf if self.max_pages is None else self.max_pages - self._pages
        while len(self._free) + fresh_left < n and self._idle:
            self._evict(next(iter(self._idle)))
        got = self._take_free(n, after)
        for p in got:
            self._refs[p] = 1
        return got

    def _take_free(self, n: int, after: int | None) -> list[int]:
        if after is not None and (run := self._claim(after + 1, n)) is not None:
            return run
        start = count = 0
        for k, page in enumerate(self._free):
            start, count = (start, count + 1) if k and page == self._free[k - 1] + 1 else (page, 1)
            if count == n or (page == self._pages - 1 and self._is_free(page + n - count)):
                got = self._claim(start, n)
                if got is not None:
                    return got
        if (got := self._claim(self._pages, n)) is not None:
            return got
        got, self._free = self._free[:n], self._free[n:]
        fresh = n - len(got)
        got += range(self._pages, self._pages + fresh)
        self._pages += fresh
        return got

    # -- the scheduler's Allocator --------------------------------------------------------------------

    def allocate(self, capacity: int, shared: Sequence[int] = ()) -> KVPages:
        """A stream's pages: ``shared`` (cached pages of its prefix, from ``match``) then its own."""
        for p in shared:
            self._hold(p)
        own = self._take(math.ceil(capacity / PAGE_SIZE) - len(shared))
        return KVPages([*shared, *own], capacity)

    def grow(self, handle: KVPages, used: int, capacity: int) -> KVPages:
        last = handle.pages[-1] if handle.pages else None
        handle.pages += self._take(math.ceil(capacity / PAGE_SIZE) - len(handle.pages), after=last)
        handle.capacity = capacity
        handle.check_run()
        return handle

    def release(self, handle: KVPages) -> None:
        for p in handle.pages:
            self._drop(p)
        handle.pages = []
        handle.first = -1

    def _hold(self, page: int) -> None:
        self._refs[page] = self._refs.get(page, 0) + 1
        self._idle.pop(page, None)

    def _drop(self, page: int) -> None:
        left = self._refs[page] - 1
        if left:
            self._refs[page] = left
            return
        del self._refs[page]
        if page in self._key_of and self.cache_pages > 0:
            self._idle[page] = None  # kept for reuse, the newest last
            while len(self._idle) > self.cache_pages:
                self._evict(next(iter(self._idle)))
        else:
            if page in self._key_of:
                del self._page_of[self._key_of.pop(page)]
            bisect.insort(self._free, page)

    # -- the prefix cache -----------------------------------------------------------------------------

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of ``keys`` (a new stream's full prompt pages)."""
        pages: list[int] = []
        if self.cache_pages <= 0:
            return pages
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        for p in pages:  # a hit is a use: to the back of the eviction order
            if p in self._idle:
                self._idle.move_to_end(p)
        return pages

    def register(self, handle: KVPages, index: int, key: bytes) -> None:
        """Page ``index`` of a stream is full and computed: others may share it from now on (it is
        immutable). A key already cached keeps its page; this one stays the stream's own."""
        page = handle.pages[index]
        if self.cache_pages <= 0 or key in self._page_of or page in self._key_of:
            return
        self._page_of[key] = page
        self._key_of[page] = key

    def prepare_write(self, handle: KVPages, start: int, end: int) -> list[tuple[int, int]]:
        """Before positions ``start..end`` of a stream are written: each page among them that is
        cached or shared is replaced by one of its own (copy-on-write). Returns the (from, to) page
        copies the runner makes first, for pages whose positions before ``start`` must be kept."""
        copies: list[tuple[int, int]] = []
        if end <= start:
            return copies
        for index in range(start // PAGE_SIZE, min(len(handle.pages), math.ceil(end / PAGE_SIZE))):
            page = handle.pages[index]
            if self._refs.get(page, 0) <= 1 and page not in self._key_of:
                continue
            (own,) = self._take(1, after=handle.pages[index - 1] if index else None)
            if index * PAGE_SIZE < start:
                copies.append((page, own))
            handle.pages[index] = own
            self._drop(page)
        handle.check_run()
        return copies

    def adopt(self, handle: KVPages, index: int, pages: Sequence[int]) -> None:
        """Cached ``pages`` (from ``match``) replace the stream's own from page ``index`` on: another
        stream computed them while this one waited, before it wrote anything there."""
        for k, page in enumerate(pages):
            self._hold(page)
            old, handle.pages[index + k] = handle.pages[index + k], page
            self._drop(old)
        handle.check_run()

    def clear_cache(self) -> None:
        """Forget every cached page (their contents are gone, as when the guard's process died)."""
        for page in list(self._idle):
            self._evict(page, counted=False)
        self._key_of.clear()
        self._page_of.clear()
