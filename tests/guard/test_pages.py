"""The paged KV allocator and the grouping of one-token streams, alone (the engine parity tests run
them against a full forward)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.attention import decode_groups
from guardproxy.guard.pages import PAGE_SIZE, KVPages, PagePool


@given(st.lists(st.integers(1, 5000), max_size=40), st.sampled_from([0, 16, 256]))
def test_decode_groups_cover_every_stream_once_with_bounded_padding(lengths: list[int], slack: int) -> None:
    groups = decode_groups(lengths, slack)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        ls = [lengths[i] for i in g]
        assert ls == sorted(ls, reverse=True)  # the longest first: it sets the padded length
        if len(g) > 1:
            assert ls[0] * len(g) <= 2 * sum(ls) + slack


def test_streams_get_runs_grow_in_place_and_reuse_freed_runs() -> None:
    r = PagePool(max_pages=64)
    a = r.allocate(3 * PAGE_SIZE)
    b = r.allocate(2 * PAGE_SIZE - 5)  # a part page still takes a page
    assert (a.pages, a.first, b.pages, b.first) == ([0, 1, 2], 0, [3, 4], 3)
    r.grow(b, 20, 4 * PAGE_SIZE)  # the pages after it are free: still one run
    assert b.pages == [3, 4, 5, 6] and b.first == 3
    r.grow(a, 40, 4 * PAGE_SIZE)  # page 3 is b's: a's new page is elsewhere, a is no longer a run
    assert a.pages == [0, 1, 2, 7] and a.first == -1
    r.release(a)
    c = r.allocate(3 * PAGE_SIZE)  # the first free run that fits
    assert c.pages == [0, 1, 2] and c.first == 0
    d = r.allocate(2 * PAGE_SIZE)  # page 7 alone is too short; the run 7-8 reaches fresh pages
    assert d.pages == [7, 8] and d.first == 7


def test_a_full_pool_hands_out_scattered_pages_before_going_past_its_cap() -> None:
    r = PagePool(max_pages=8)
    held = [r.allocate(PAGE_SIZE) for _ in range(8)]
    for h in held[::2]:
        r.release(h)  # pages 0, 2, 4, 6 free: no run of two
    e = r.allocate(2 * PAGE_SIZE)
    assert e.pages == [0, 2] and e.first == -1
    assert r._pages == 8  # nothing fresh past the cap while free pages were enough


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(1, 6), st.integers(0, 9))))
def test_no_page_is_ever_held_twice(ops: list[tuple[str, int, int]]) -> None:
    r = PagePool(max_pages=24)
    live: list[KVPages] = []
    most = 0
    for op, pages, which in ops:
        if op == "alloc" or not live:
            live.append(r.allocate(pages * PAGE_SIZE))
        elif op == "grow":
            h = live[which % len(live)]
            r.grow(h, 0, h.capacity + pages * PAGE_SIZE)
        else:
            r.release(live.pop(which % len(live)))
        held = [p for h in live for p in h.pages]
        most = max(most, len(held))
        assert len(held) == len(set(held))
        assert not set(held) & set(r._free)
        for h in live:
            assert len(h.pages) * PAGE_SIZE >= h.capacity
            assert (h.first >= 0) == (h.pages == list(range(h.pages[0], h.pages[0] + len(h.pages))))
        if most <= 24:  # all ever held at once fits under the cap: the pool never went past it
            assert r._pages <= 24
