"""The KV manager: what the scheduler asks about memory, and nothing about scheduling.

It holds the reservation accounting (how many KV positions live streams hold against
``max_cached_tokens``), starts a stream on the cached pages of its prompt, grows a stream's reservation,
prepares a step's writes (copy-on-write), puts computed pages in the prefix cache, and keeps the claims
that make a prompt page computed once. The page ids themselves are the allocator's (``pages.PagePool``);
the scheduler decides who runs and when. vLLM v1 splits its scheduler the same way
(``KVCacheManager.get_computed_blocks`` / ``allocate_slots``).

Reservations: a stream reserves ``prompt + response_reserve`` positions at admission and grows in
``response_reserve`` steps (at least what a step needs), never past ``max_positions``, never past the
pool: a stream that cannot grow waits (the scheduler's rule).

Prefix caching (``prefix_cache``): a new stream starts on the cached pages of the longest common prefix
its prompt has with what earlier streams computed (full pages, identified by their ids and all before
them; ``pages.py``), never past the prompt verdict's position (a verdict is not cached, so that position
is always computed). After each step a stream's newly full pages join the cache; before each write,
pages that are shared or cached are replaced by the stream's own. A prompt page another live stream is
computing now is waited for, not computed twice: the later stream holds its prefill until that page is
cached, then matches again. The cache never reduces how many streams are admitted: a stream's whole
reservation counts as if it shared nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from guardproxy.guard.errors import PromptTooLong
from guardproxy.guard.limits import EngineLimits, round_up
from guardproxy.guard.pages import PAGE_SIZE, page_keys


class Allocator(Protocol):
    """Owns KV memory (``pages.PagePool``). Handles are opaque to the scheduler."""

    def allocate(self, capacity: int, shared: Sequence[Any] = ()) -> Any: ...

    def grow(self, handle: Any, used: int, capacity: int) -> Any: ...

    def release(self, handle: Any) -> None: ...

    def match(self, keys: Sequence[bytes]) -> list[Any]:
        """Cached pages of the longest prefix of these page keys."""
        ...

    def register(self, handle: Any, index: int, key: bytes) -> None:
        """A stream's page ``index`` is full and computed: shareable from now on."""
        ...

    def prepare_write(self, handle: Any, start: int, end: int) -> list[tuple[int, int]]:
        """Copy-on-write before positions ``start..end`` are written: the page copies to make."""
        ...

    def adopt(self, handle: Any, index: int, pages: Sequence[Any]) -> None:
        """Cached ``pages`` replace the stream's own from page ``index`` on (nothing written there yet)."""
        ...

    def clear_cache(self) -> None: ...


class HoldsKV(Protocol):
    """What the manager reads and keeps of a stream (the scheduler's ``StreamState``)."""

    sid: int
    kv: Any
    capacity: int
    cached: int  # positions written (or being written by a step in flight)
    ids: list[int]  # the token at each position up to ``cached``
    keys: list[bytes]  # keys of its full pages, from the first on
    prompt_keys: list[bytes]  # keys of the prompt pages it may share
    waiting_prefix: bool  # another stream is computing its next prompt page: it waits for it


class KVManager:
    def __init__(self, limits: EngineLimits, allocator: Allocator, live: Callable[[int], bool]) -> None:
        """``live(sid)``: whether that stream may still compute (a prompt page it claimed is waited for
        only while it may)."""
        self.limits = limits
        self.allocator = allocator
        self._live = live
        self.reserved = 0  # KV positions reserved by live streams
        self.prefix_hit_tokens = 0  # context positions new streams took from the prefix cache
        self._computing: dict[bytes, int] = {}  # prompt pages a live stream is computing: key -> sid

    # -- reservations --------------------------------------------------------------------------------

    def cost(self, prompt_len: int) -> int:
        """What a stream of this prompt reserves at admission."""
        lim = self.limits
        if prompt_len < 1:
            raise PromptTooLong("the guard prompt is empty")
        if prompt_len > lim.max_prompt_tokens:
            raise PromptTooLong(
                f"guard prompt of {prompt_len} tokens exceeds the engine's {lim.max_prompt_tokens}"
            )
        return min(lim.max_positions, round_up(prompt_len + lim.response_reserve))

    def fits(self, cost: int) -> bool:
        return self.reserved + cost <= self.limits.max_cached_tokens

    def open(self, prompt: list[int], verdict_index: int | None, cost: int) -> tuple[Any, list[bytes], int]:
        """Reserve ``cost`` positions for a new stream, on the cached pages of its prompt where there are
        some: (its KV handle, its prompt pages' keys, the positions already computed)."""
        shared: list[Any] = []
        keys: list[bytes] = []
        if self.limits.prefix_cache:
            # Whole pages only, and never past the verdict's position: it must be computed.
            usable = len(prompt) // PAGE_SIZE
            if verdict_index is not None:
                usable = min(usable, verdict_index // PAGE_SIZE)
            keys = page_keys(prompt[: usable * PAGE_SIZE])
            shared = self.allocator.match(keys)
        kv = self.allocator.allocate(cost, shared)
        hit = len(shared) * PAGE_SIZE
        self.prefix_hit_tokens += hit
        self.reserved += cost
        return kv, keys, hit

    def grow(self, s: HoldsKV, n: int) -> bool:
        """Make room for ``n`` more positions after ``cached``: by the reserve (amortised), or at least
        by what is needed, within the context limit and the pool. Whether it grew."""
        lim = self.limits
        need = round_up(min(lim.max_positions, s.cached + n))
        for want in (
            min(lim.max_positions, round_up(max(s.cached + n, s.capacity + lim.response_reserve))),
            need,
        ):
            extra = want - s.capacity
            if extra > 0 and self.reserved + extra <= lim.max_cached_tokens:
                s.kv = self.allocator.grow(s.kv, s.cached, want)
                s.capacity = want
                self.reserved += extra
                return True
        return False

    def release(self, s: HoldsKV) -> None:
        if s.kv is not None:
            self.reserved -= s.capacity
            self.allocator.release(s.kv)
            s.kv, s.capacity = None, 0

    # -- writes and the prefix cache -----------------------------------------------------------------

    def prepare_write(self, s: HoldsKV, n: int) -> tuple[tuple[int, int], ...]:
        """The page copies to make before the stream's next ``n`` positions are written."""
        return tuple(self.allocator.prepare_write(s.kv, s.cached, s.cached + n))

    def register(self, s: HoldsKV, computed: int) -> None:
        """The stream's pages that are full and computed (every position before ``computed`` is, by
        steps that have completed) join the prefix cache."""
        if not self.limits.prefix_cache:
            return
        full = min(computed, s.cached, len(s.ids)) // PAGE_SIZE
        if full <= len(s.keys):
            return
        first = len(s.keys)
        s.keys += page_keys(s.ids[: full * PAGE_SIZE], s.keys[-1] if s.keys else None, first)
        for index in range(first, full):
            self.allocator.register(s.kv, index, s.keys[index])
            if self._computing.get(s.keys[index]) == s.sid:
                del self._computing[s.keys[index]]

    def clear_cache(self, streams: Sequence[HoldsKV]) -> None:
        """The pages' contents are gone (the guard's process died): nothing cached may be reused."""
        self.allocator.clear_cache()
        self._computing.clear()
        for s in streams:
            s.keys = []

    # -- prompt pages computed once ------------------------------------------------------------------

    def claim(self, s: HoldsKV) -> None:
        """The stream computes the prompt pages nobody has cached, unless another live stream is
        computing the next one already: then it waits for that stream's pages."""
        first = len(s.keys)
        if first >= len(s.prompt_keys):
            s.waiting_prefix = False
            return
        other = self._computer(s.prompt_keys[first])
        if other is not None and other != s.sid:
            s.waiting_prefix = True
            return
        s.waiting_prefix = False
        for key in s.prompt_keys[first:]:
            if self._computer(key) is None:
                self._computing[key] = s.sid

    def advance(self, s: HoldsKV) -> int:
        """A waiting stream takes what the stream it waited for has cached since, then claims or waits
        again. Returns how many more of its prompt positions are computed now (its pending ones)."""
        pages = self.allocator.match(s.prompt_keys)
        have = len(s.keys)
        more = 0
        if len(pages) > have:
            self.allocator.adopt(s.kv, have, pages[have:])
            more = (len(pages) - have) * PAGE_SIZE
            s.keys = list(s.prompt_keys[: len(pages)])
            self.prefix_hit_tokens += more
        self.claim(s)
        return more

    def drop_claims(self, sid: int) -> None:
        """A failed or closed stream computes nothing more for the others."""
        for key in [k for k, owner in self._computing.items() if owner == sid]:
            del self._computing[key]

    def _computer(self, key: bytes) -> int | None:
        sid = self._computing.get(key)
        return sid if sid is not None and self._live(sid) else None
