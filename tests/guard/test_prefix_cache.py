"""Prefix caching: the page pool's sharing rules alone, then the scheduler and the real runner (float64)
against a full forward: verdicts are the same with shared pages, whatever the shared prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.pages import PAGE_SIZE, PagePool, page_keys
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import QUERY, RESPONSE, Scheduler, Ticket

from .pipeline import Pipeline

# -- the pool alone --------------------------------------------------------------------------------------


def test_keys_chain_whole_pages() -> None:
    a = list(range(40))
    keys = page_keys(a)
    assert len(keys) == 2  # two full pages; the 8 positions after are no page yet
    assert page_keys(a[:32]) == keys and page_keys(a, keys[0], 1) == keys[1:]
    b = [*a[:16], 99, *a[17:]]
    assert page_keys(b)[0] == keys[0] and page_keys(b)[1] != keys[1]  # same first page, not the second
    c = [7, *a[1:]]
    assert page_keys(c)[1] != keys[1]  # the second page's ids agree, what came before does not


def test_cached_pages_are_shared_kept_and_evicted_oldest_first() -> None:
    pool = PagePool(max_pages=10, cache_pages=4)
    a = pool.allocate(3 * PAGE_SIZE)
    assert a.pages == [0, 1, 2]
    keys = page_keys(list(range(3 * PAGE_SIZE)))
    for i, k in enumerate(keys):
        pool.register(a, i, k)
    b = pool.allocate(4 * PAGE_SIZE, pool.match(keys[:2]))  # shares a's first two pages, then 3 and 4
    assert b.pages == [0, 1, 3, 4] and pool.cached_pages == 3
    pool.release(a)  # page 2 waits in the cache; pages 0 and 1 are still b's
    assert pool.match(keys) == [0, 1, 2] and pool.evictions == 0
    c = pool.allocate(6 * PAGE_SIZE)  # 5 fresh pages left: the idle cached page 2 is evicted for a sixth
    assert pool.evictions == 1 and 2 in c.pages and not {0, 1} & set(c.pages)  # never a page b holds
    assert pool.match(keys) == [0, 1]
    pool.release(b)
    pool.release(c)
    assert pool.cached_pages == 2  # pages 0 and 1 wait for reuse
    small = PagePool(max_pages=10, cache_pages=1)  # the bound on idle cached pages
    d = small.allocate(3 * PAGE_SIZE)
    for i, k in enumerate(keys):
        small.register(d, i, k)
    small.release(d)
    assert small.cached_pages == 1 and small.evictions == 2


def test_a_write_into_a_cached_or_shared_page_gets_its_own_copy() -> None:
    pool = PagePool(max_pages=16, cache_pages=8)
    a = pool.allocate(2 * PAGE_SIZE)
    key = page_keys(list(range(PAGE_SIZE)))[0]
    pool.register(a, 0, key)
    first = a.pages[0]
    assert pool.prepare_write(a, 16, 20) == []  # page 1 is a's alone: written in place
    copies = pool.prepare_write(a, 10, 20)  # back into the cached page: a copy, then a's own
    assert copies == [(first, a.pages[0])] and a.pages[0] != first
    assert pool.match([key]) == [first]  # the cached page is untouched and still shareable
    b = pool.allocate(2 * PAGE_SIZE, [first])
    assert pool.prepare_write(b, 0, 16) == [] and b.pages[0] != first  # rewritten whole: nothing to copy
    pool.clear_cache()
    assert pool.match([key]) == [] and pool.cached_pages == 0


# -- with the model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model64(random_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(random_checkpoint, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module", params=["reference", "batched"])
def attention(request: pytest.FixtureRequest) -> str:
    """Every test with the model runs under each attention backend."""
    return str(request.param)


@pytest.fixture(scope="module", params=[1, 2])
def depth(request: pytest.FixtureRequest) -> int:
    """...and with one step at a time or the next scheduled while one is in flight (overlap)."""
    return int(request.param)


class Rig:
    """A scheduler over the real runner, driven by hand; every verdict checked against a full forward."""

    def __init__(
        self,
        model: Qwen3GuardStream,
        max_pages: int | None = None,
        attention: str = "reference",
        depth: int = 1,
        **limits: Any,
    ) -> None:
        self.model = model
        defaults: dict[str, Any] = dict(
            max_cached_tokens=4096, response_reserve=32, anchor_tokens=32, window_tokens=48, prefill_chunk=40
        )
        self.limits = EngineLimits(**{**defaults, **limits})
        pages = max_pages or self.limits.max_cached_tokens // PAGE_SIZE + self.limits.max_streams
        self.pool = PagePool(max_pages=pages, cache_pages=256)
        self.runner = ModelRunner(model, attention=attention)
        self.s = Scheduler(self.limits, self.pool)
        self.pipeline = Pipeline(self.s, self.runner.execute, depth)
        self.context: dict[int, list[int]] = {}  # what each stream holds, as a full forward would read it
        self.expect: dict[int, list[list[Any]]] = {}  # per feed: [ticket, its first position, verdicts kept]

    def open(self, prompt: list[int], verdict: int | None) -> int:
        sid = self.s.add_stream(prompt, verdict)
        self.context[sid] = list(prompt)
        self.expect[sid] = []
        return sid

    def feed(self, sid: int, ids: list[int]) -> Ticket:
        t = self.s.feed(sid, ids)
        assert t is not None
        self.expect[sid].append([t, len(self.context[sid]), len(ids)])
        self.context[sid] += ids
        return t

    def retract(self, sid: int, n: int) -> None:
        """Take back the newest ``n``: their verdicts, delivered or not, no longer count."""
        self.s.retract(sid, n)
        del self.context[sid][len(self.context[sid]) - n :]
        for feed in reversed(self.expect[sid]):
            take = min(n, feed[2])
            feed[2] -= take
            n -= take

    def run(self) -> None:
        self.pipeline.drain()

    def reference(self, ids: list[int]) -> Any:
        with torch.no_grad():
            return self.model(torch.tensor([ids]))


def check_verdicts(rig: Rig, sid: int, prompt_ticket: Ticket | None, verdict: int | None) -> None:
    """Every verdict of the stream equals a full forward of what it holds (float64, 1e-9)."""
    ids = rig.context[sid]
    out = rig.reference(ids)
    if prompt_ticket is not None and verdict is not None:
        got = torch.tensor(prompt_ticket.results[0][0], dtype=torch.float64)
        torch.testing.assert_close(got, out.query.risk[0, verdict], atol=1e-9, rtol=0)
    for t, start, kept in rig.expect[sid]:
        assert t.done and t.error is None and len(t.results) >= kept
        for k, r in enumerate(t.results[:kept]):
            torch.testing.assert_close(
                torch.tensor(r[0], dtype=torch.float64), out.response.risk[0, start + k], atol=1e-9, rtol=0
            )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(data=st.data())
def test_shared_prefixes_of_every_length_give_the_same_verdicts(
    model64: Qwen3GuardStream, attention: str, depth: int, data: st.DataObject
) -> None:
    rig = Rig(
        model64,
        attention=attention,
        depth=depth,
        prefill_chunk=data.draw(st.sampled_from([7, 40, 512]), label="chunk"),
    )
    base = data.draw(st.lists(st.integers(0, 151642), min_size=17, max_size=90), label="first prompt")
    a_verdict = len(base) - 1
    a = rig.open(base, a_verdict)
    a_ticket = rig.s.streams[a].prompt_ticket
    rig.feed(a, data.draw(st.lists(st.integers(0, 151642), min_size=1, max_size=40), label="a's answer"))
    rig.run()
    held = list(rig.context[a])  # a's prompt and answer: the cache holds the pages of both
    if data.draw(st.booleans(), label="close a first"):
        rig.s.close(a)
    # The second prompt shares any prefix with the first: inside a page, on a page's end, all of it.
    common = data.draw(st.integers(0, len(base)), label="common prefix")
    tail = data.draw(st.lists(st.integers(0, 151642), min_size=1, max_size=40), label="own part")
    prompt = [*base[:common], *tail]
    # The tail may go on as a's prompt or answer did (all zeros, say): the prefix they really share.
    common = next(
        (i for i, (x, y) in enumerate(zip(held, prompt, strict=False)) if x != y), min(len(held), len(prompt))
    )
    verdict = data.draw(
        st.sampled_from(sorted({len(prompt) - 1, min(common, len(prompt) - 1), max(0, common - 1)})),
        label="verdict at",
    )
    hits = rig.s.kv.prefix_hit_tokens
    b = rig.open(prompt, verdict)
    b_ticket = rig.s.streams[b].prompt_ticket
    rig.feed(b, data.draw(st.lists(st.integers(0, 151642), min_size=1, max_size=30), label="b's answer"))
    rig.run()
    # What was reused: whole pages of the common prefix, never past the verdict's own position.
    assert rig.s.kv.prefix_hit_tokens - hits == min(common, verdict) // PAGE_SIZE * PAGE_SIZE
    check_verdicts(rig, b, b_ticket, verdict)
    if a in rig.s.streams:
        check_verdicts(rig, a, a_ticket, a_verdict)


def test_a_retraction_into_a_cached_page_leaves_the_cache_intact(
    model64: Qwen3GuardStream, attention: str, depth: int
) -> None:
    rig = Rig(model64, attention=attention, depth=depth)
    prompt = list(range(1000, 1020))  # 20 positions: page 0 full, page 1 part
    a = rig.open(prompt, 19)
    a_ticket = rig.s.streams[a].prompt_ticket
    first = list(range(5000, 5020))  # fills page 1 (to 32) and part of page 2
    rig.feed(a, first)
    rig.run()
    assert rig.pool.cached_pages == 2  # pages 0 and 1 are full: cached
    rig.retract(a, 14)  # back to position 26: into page 1, which is cached
    rig.feed(a, list(range(7000, 7010)))
    rig.run()
    check_verdicts(rig, a, a_ticket, 19)
    # A stream that holds what a held before it took the tokens back reads the cached page as it was.
    c = rig.open([*prompt, *first], None)
    assert rig.s.streams[c].cached == 32  # both cached pages reused
    rig.feed(c, [9, 10, 11])
    rig.run()
    check_verdicts(rig, c, None, None)


def test_a_stream_whose_head_is_shared_slides_on_pages_of_its_own(
    model64: Qwen3GuardStream, attention: str, depth: int
) -> None:
    rig = Rig(
        model64,
        attention=attention,
        depth=depth,
        max_positions=128,
        response_reserve=32,
        anchor_tokens=16,
        window_tokens=40,
    )
    prompt = list(range(2000, 2050))
    a = rig.open(prompt, 49)
    a_ticket = rig.s.streams[a].prompt_ticket
    rig.run()
    b = rig.open(prompt, 49)
    b_ticket = rig.s.streams[b].prompt_ticket
    assert rig.s.streams[b].cached == 48  # pages 0-2 shared with a
    for k in range(0, 200, 20):  # b outgrows the context and slides, rewriting from position 0
        rig.feed(b, list(range(6000 + k, 6020 + k)))
        rig.run()
    assert rig.s.streams[b].slides >= 1
    assert (
        b_ticket is not None
        and b_ticket.done
        and all(t.done and t.error is None for t, _, _ in rig.expect[b])
    )
    rig.feed(a, list(range(8000, 8030)))  # a still reads its (shared) head intact
    rig.run()
    check_verdicts(rig, a, a_ticket, 49)


def test_eviction_under_pressure_never_takes_a_page_in_use(
    model64: Qwen3GuardStream, attention: str, depth: int
) -> None:
    # 40 pages in all; a stream of a 100-token prompt takes 9 (6 of them full, so cached).
    rig = Rig(
        model64,
        attention=attention,
        depth=depth,
        max_pages=40,
        max_cached_tokens=640,
        response_reserve=32,
        anchor_tokens=16,
        max_streams=8,
    )
    prompt = list(range(3000, 3100))
    a = rig.open(prompt, 99)
    d = rig.open(list(range(3500, 3600)), 99)
    rig.run()
    rig.s.close(a)
    rig.s.close(d)  # 12 cached pages wait for reuse
    b = rig.open(prompt, 99)
    b_ticket = rig.s.streams[b].prompt_ticket
    assert rig.s.streams[b].cached == 96  # a's 6 pages, held by b now
    others = [rig.open(list(range(4000 + 200 * k, 4100 + 200 * k)), 99) for k in range(3)]
    rig.run()
    assert rig.pool.evictions >= 2  # 27 pages needed, 25 free or fresh: d's pages give way, a's do not
    rig.feed(b, list(range(9000, 9010)))
    rig.run()
    check_verdicts(rig, b, b_ticket, 99)
    for sid in [*others, b]:
        rig.s.close(sid)
    assert rig.s.kv.reserved == 0


def test_n_choices_share_the_prompt(model64: Qwen3GuardStream, attention: str, depth: int) -> None:
    rig = Rig(model64, attention=attention, depth=depth)
    prompt = list(range(100, 300))  # 200 positions: 12 full pages and 8 more
    first = rig.open(prompt, 199)
    rig.run()
    before = rig.s.prefill_tokens
    others = [rig.open(prompt, None) for _ in range(3)]
    rig.run()
    # Each further choice computes only its part page (8 positions), not the 200.
    assert rig.s.prefill_tokens - before == 3 * (200 - 192)
    for sid in [first, *others]:
        rig.feed(sid, [5, 6])
    rig.run()
    for sid in others:
        check_verdicts(rig, sid, None, None)


def test_positions_kinds_never_shift_with_a_hit(
    model64: Qwen3GuardStream, attention: str, depth: int
) -> None:
    """The verdict position keeps its kind when the prompt's head comes from the cache."""
    rig = Rig(model64, attention=attention, depth=depth)
    prompt = list(range(10, 60))
    rig.open(prompt, 49)
    rig.run()
    sid = rig.open(prompt, 49)
    s = rig.s.streams[sid]
    assert s.cached == 48 and s.pend_ids == prompt[48:] and s.pend_kind == [0, QUERY]
    assert RESPONSE not in s.pend_kind


def test_streams_arriving_together_compute_a_shared_prompt_once(
    model64: Qwen3GuardStream, attention: str, depth: int
) -> None:
    rig = Rig(model64, attention=attention, depth=depth, prefill_chunk=64, max_batch_tokens=256)
    system = list(range(500, 700))  # 200 positions shared, then each client's own question
    prompts = [[*system, 9000 + k, 9100 + k, 9200 + k] for k in range(6)]
    sids = [rig.open(p, len(p) - 1) for p in prompts]
    tickets = [rig.s.streams[sid].prompt_ticket for sid in sids]
    assert [rig.s.streams[sid].waiting_prefix for sid in sids] == [False] + [True] * 5
    rig.run()
    # The shared 192 whole positions once; each client its own part page (8 shared ids and 3 own).
    assert rig.s.prefill_tokens == 203 + 5 * 11 and rig.s.kv.prefix_hit_tokens == 5 * 192
    for sid, t, p in zip(sids, tickets, prompts, strict=True):
        rig.feed(sid, [1, 2])
        rig.run()
        check_verdicts(rig, sid, t, len(p) - 1)


def test_a_waiting_stream_computes_for_itself_when_the_other_goes(
    model64: Qwen3GuardStream, attention: str, depth: int
) -> None:
    rig = Rig(model64, attention=attention, depth=depth, prefill_chunk=32, max_batch_tokens=32)
    prompt = list(range(800, 1000))
    a = rig.open(prompt, 199)
    b = rig.open(prompt, 199)
    b_ticket = rig.s.streams[b].prompt_ticket
    plan = rig.s.schedule()
    assert plan is not None and [i.sid for i in plan.items] == [a]  # b waits for a's pages
    rig.s.complete(plan, rig.runner.execute(plan.items))
    rig.s.close(a)  # a goes after two pages: b takes those and computes the rest itself
    rig.run()
    assert rig.s.kv.prefix_hit_tokens == 32 and not rig.s.streams[b].waiting_prefix
    check_verdicts(rig, b, b_ticket, 199)
