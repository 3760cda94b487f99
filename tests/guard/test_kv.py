"""The KV manager alone (``guard/kv.py``), over the real page pool: reservations, growth, and the claims
that make a prompt page computed once. (The scheduler's and the prefix cache's suites drive it whole.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from guardproxy.guard.errors import PromptTooLong
from guardproxy.guard.kv import KVManager
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.pages import PAGE_SIZE, PagePool


@dataclass(eq=False)
class Stream:
    """What the manager reads and keeps of a stream (the scheduler's StreamState has more)."""

    sid: int
    kv: Any
    capacity: int
    cached: int = 0
    ids: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    prompt_keys: list[bytes] = field(default_factory=list)
    waiting_prefix: bool = False


LIMITS = EngineLimits(max_cached_tokens=256, response_reserve=32, anchor_tokens=16, max_positions=128)


def manager(live: set[int] | None = None) -> KVManager:
    alive = live if live is not None else set()
    return KVManager(LIMITS, PagePool(max_pages=64, cache_pages=16), lambda sid: sid in alive)


def opened(kv: KVManager, sid: int, prompt: list[int], verdict: int | None = None) -> Stream:
    cost = kv.cost(len(prompt))
    handle, keys, hit = kv.open(prompt, verdict, cost)
    return Stream(
        sid, handle, cost, cached=hit, ids=prompt[:hit], keys=keys[: hit // PAGE_SIZE], prompt_keys=keys
    )


def test_a_reservation_is_the_prompt_and_a_reserve_in_whole_pages_within_the_pool() -> None:
    kv = manager()
    assert kv.cost(1) == 48 and kv.cost(17) == 64 and kv.cost(96) == 128  # never past max_positions
    for bad in (0, LIMITS.max_prompt_tokens + 1):
        with pytest.raises(PromptTooLong):
            kv.cost(bad)
    a = opened(kv, 1, list(range(20)))
    assert kv.reserved == 64 and kv.fits(192) and not kv.fits(193)
    kv.release(a)
    assert kv.reserved == 0 and a.kv is None and a.capacity == 0


def test_growth_takes_a_reserve_or_what_is_needed_and_never_more_than_the_pool() -> None:
    kv = manager()
    a = opened(kv, 1, list(range(20)))  # 64 positions
    a.cached = 64
    assert kv.grow(a, 1) and a.capacity == 96 and kv.reserved == 96  # by the reserve
    b = opened(kv, 2, list(range(90)))  # 128: the pool holds 32 more
    assert kv.reserved == 224
    a.cached = 96
    assert kv.grow(a, 40) and a.capacity == 128  # at the context limit: what fits there
    assert kv.reserved == 256 and not kv.fits(1)
    b.cached = 128
    assert not kv.grow(b, 1) and b.capacity == 128  # past max_positions: the scheduler slides


def test_a_prompt_page_being_computed_is_waited_for_then_taken_from_the_cache() -> None:
    live = {1, 2}
    kv = manager(live)
    prompt = list(range(100, 140))  # pages 0 and 1 full
    a = opened(kv, 1, prompt, verdict=39)
    kv.claim(a)
    assert not a.waiting_prefix and len(a.prompt_keys) == 2
    b = opened(kv, 2, prompt, verdict=39)
    kv.claim(b)
    assert b.waiting_prefix and b.cached == 0  # a computes both pages: b waits
    a.cached, a.ids = 40, list(prompt)  # a's step computed them
    kv.register(a, a.cached)
    assert kv.advance(b) == 32 and not b.waiting_prefix  # both pages adopted, nothing left to wait for
    assert kv.prefix_hit_tokens == 32
    c = opened(kv, 3, prompt, verdict=39)
    assert c.cached == 32  # a new stream starts on them at once


def test_a_claim_of_a_stream_that_is_gone_is_not_waited_for() -> None:
    live = {1, 2}
    kv = manager(live)
    prompt = list(range(100, 140))
    a = opened(kv, 1, prompt, verdict=39)
    kv.claim(a)
    live.discard(1)  # a failed or closed before computing its pages
    b = opened(kv, 2, prompt, verdict=39)
    kv.claim(b)
    assert not b.waiting_prefix  # b computes them itself, and claims them
    c = opened(kv, 3, prompt, verdict=39)
    kv.claim(c)
    assert c.waiting_prefix  # c waits for b
    kv.drop_claims(2)  # b is closed
    live.add(1)
    d = opened(kv, 4, prompt, verdict=39)
    kv.claim(d)
    assert not d.waiting_prefix  # nobody claims them now (a's claim went to b): d computes them
