"""The scheduler alone, driven by hand with a fake allocator and hand-made outputs (no model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.guard.errors import EngineError, EngineOverloaded, GuardFailure, PromptTooLong, StreamClosed
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.scheduler import (
    CONTEXT,
    NO_OUTPUT,
    QUERY,
    RESPONSE,
    ItemOutput,
    Scheduler,
    StepPlan,
    Ticket,
    fair_shares,
)

from .pipeline import Pipeline


@dataclass(eq=False)
class FakeKV:
    capacity: int

    def snapshot(self) -> FakeKV:
        return FakeKV(self.capacity)


class FakeAllocator:
    """Memory accounting only: no prefix cache (the page pool's own tests cover sharing)."""

    def __init__(self) -> None:
        self.live: list[FakeKV] = []

    def allocate(self, capacity: int, shared: Any = ()) -> FakeKV:
        assert not shared
        kv = FakeKV(capacity)
        self.live.append(kv)
        return kv

    def match(self, keys: Any) -> list[Any]:
        return []

    def register(self, handle: FakeKV, index: int, key: bytes) -> None:
        pass

    def prepare_write(self, handle: FakeKV, start: int, end: int) -> list[tuple[int, int]]:
        return []

    def adopt(self, handle: FakeKV, index: int, pages: Any) -> None:
        raise AssertionError("no page is ever cached here")

    def clear_cache(self) -> None:
        pass

    def grow(self, handle: FakeKV, used: int, capacity: int) -> FakeKV:
        assert used <= handle.capacity < capacity
        self.live.remove(handle)
        return self.allocate(capacity)

    def release(self, handle: FakeKV) -> None:
        self.live.remove(handle)


def outputs_for(plan: StepPlan) -> list[ItemOutput]:
    """Hand-made outputs: each verdict's risk probs encode the token id, so routing is checkable."""
    outs = []
    for item in plan.items:
        q = [((float(t),), (0.0,)) for t, k in zip(item.ids, item.kinds, strict=True) if k == QUERY]
        r = [((float(t),), (0.0,)) for t, k in zip(item.ids, item.kinds, strict=True) if k == RESPONSE]
        outs.append(ItemOutput(query=q, response=r))
    return outs


def run_all(s: Scheduler, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    for _ in range(max_steps):
        plan = s.schedule()
        if plan is None:
            return plans
        for item in plan.items:
            assert item.start + len(item.ids) <= item.kv.capacity, "a step would write past the cache"
        s.complete(plan, outputs_for(plan))
        plans.append(plan)
    raise AssertionError("scheduler did not drain")


@given(st.lists(st.integers(0, 600), max_size=40), st.integers(0, 3000))
def test_fair_shares_are_max_min_fair(demands: list[int], budget: int) -> None:
    shares = fair_shares(demands, budget)
    assert all(0 <= s <= d for s, d in zip(shares, demands, strict=True))
    assert sum(shares) == min(budget, sum(demands))
    # Nobody who got less than asked got less than anybody else's share (max-min fairness, +1 rounding).
    for s, d in zip(shares, demands, strict=True):
        if s < d:
            assert all(s + 1 >= other for other in shares)


def test_budgets_hold_and_every_token_is_answered_once() -> None:
    lim = EngineLimits(
        max_batch_tokens=40,
        max_batch_streams=3,
        prefill_chunk=16,
        max_cached_tokens=4096,
        response_reserve=32,
        anchor_tokens=64,
        window_tokens=64,
        max_positions=512,
    )
    s = Scheduler(lim, FakeAllocator())
    tickets = {}
    for n in range(5):
        sid = s.add_stream(list(range(1000, 1000 + 30 + n)), verdict_index=29)
        s.feed(sid, [7, 7], judge=False)
        tickets[sid] = s.feed(sid, list(range(n * 100, n * 100 + 25)))
    plans = run_all(s)
    for plan in plans:
        assert plan.tokens <= 40 and len(plan.items) <= 3
        assert all(len(i.ids) <= 16 for i in plan.items)
    for sid, t in tickets.items():
        assert t is not None and t.done and t.error is None
        assert [r[0][0] for r in t.results] == [
            float(x) for x in range((sid - 1) * 100, (sid - 1) * 100 + 25)
        ]
    # The prompt verdict is read at the verdict index: token 1029.
    assert all(st.prompt_ticket is None for st in s.streams.values())


def test_prompt_verdict_comes_from_the_verdict_position() -> None:
    s = Scheduler(EngineLimits(max_batch_tokens=8, prefill_chunk=8), FakeAllocator())
    sid = s.add_stream([5, 6, 7, 8, 9, 10, 11], verdict_index=4)
    ticket = s.streams[sid].prompt_ticket
    run_all(s)
    assert ticket is not None and ticket.results == [((9.0,), (0.0,))]


def test_admission_is_bounded_by_streams_and_memory() -> None:
    lim = EngineLimits(max_streams=2, max_cached_tokens=2048, response_reserve=256, anchor_tokens=128)
    s = Scheduler(lim, FakeAllocator())
    a = s.add_stream([1] * 100, 99)
    s.add_stream([1] * 100, 99)
    assert not s.can_admit(s.cost(10))
    with pytest.raises(EngineOverloaded):
        s.add_stream([1] * 10, 9)
    s.close(a)
    assert s.can_admit(s.cost(10))
    with pytest.raises(PromptTooLong):
        s.cost(lim.max_prompt_tokens + 1)
    mem = Scheduler(
        EngineLimits(max_cached_tokens=1024, response_reserve=256, anchor_tokens=128), FakeAllocator()
    )
    assert mem.cost(700) == 960  # prompt + response reserve, rounded up to 16
    mem.add_stream([1] * 700, 699)
    assert not mem.can_admit(mem.cost(100))  # 960 + 368 > 1024, although streams are free
    assert mem.cost(10) == 272 and not mem.can_admit(272)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_memory_never_exceeds_the_cap_and_long_responses_keep_being_judged(data: st.DataObject) -> None:
    lim = EngineLimits(
        max_streams=8,
        max_cached_tokens=1024,
        max_batch_tokens=64,
        max_batch_streams=4,
        prefill_chunk=32,
        response_reserve=64,
        anchor_tokens=32,
        window_tokens=48,
        max_positions=256,
    )
    alloc = FakeAllocator()
    s = Scheduler(lim, alloc)
    streams = []
    for _ in range(data.draw(st.integers(1, 6))):
        n = data.draw(st.integers(2, 120))
        if s.can_admit(s.cost(n)):
            streams.append(s.add_stream(list(range(n)), verdict_index=n - 1))
    tickets = []
    for _ in range(data.draw(st.integers(1, 40))):
        sid = data.draw(st.sampled_from(streams))
        tickets.append(s.feed(sid, [9] * data.draw(st.integers(1, 40))))
        plan = s.schedule()
        if plan is not None:
            s.complete(plan, outputs_for(plan))
        assert s.kv.reserved <= lim.max_cached_tokens
        assert sum(kv.capacity for kv in alloc.live) <= lim.max_cached_tokens
        assert all(st_.capacity <= lim.max_positions for st_ in s.streams.values())
    run_all(s)
    # A stream the full pool cannot grow waits (never slides before its context limit); a wait that
    # runs out fails it and frees its memory for the others, which then finish.
    while s.waiting_for_memory():
        assert s.next_expiry() == 0.0 + lim.memory_wait_s  # schedule() ran with the clock at 0
        failed = s.expire(now=lim.memory_wait_s)
        assert failed and all(isinstance(t.error, GuardFailure) for t in failed)
        run_all(s)
    assert s.slides == sum(st_.slides for st_ in s.streams.values())
    for t in tickets:
        assert t is not None and t.done
        assert t.error is None or "guard memory" in str(t.error)
    assert (s.memory_timeouts > 0) == any(t is not None and t.error is not None for t in tickets)
    # Closing gives every stream's memory back to the allocator (one closed while in flight too).
    plan = None
    live = [sid for sid in streams if s.streams[sid].failed is None]
    if live:
        s.feed(live[0], [9])
        plan = s.schedule()
    for sid in streams:
        s.close(sid)
    if plan is not None:
        assert alloc.live, "freed while a step was using it"
        s.complete(plan, outputs_for(plan))
    assert alloc.live == [] and s.kv.reserved == 0


# One stream with a short context: a long response slides instead of overflowing.
SLIDING = EngineLimits(
    max_streams=1,
    max_cached_tokens=4096,
    response_reserve=64,
    anchor_tokens=8,
    window_tokens=16,
    prefill_chunk=64,
    max_batch_tokens=64,
    max_positions=160,
)


def test_slide_replays_head_and_recent_window() -> None:
    # One stream at the guard's context limit: a long response slides instead of overflowing.
    s = Scheduler(SLIDING, FakeAllocator())
    prompt = list(range(500, 520))
    sid = s.add_stream(prompt, verdict_index=19, anchor_start=4)
    s.feed(sid, [1, 2, 3], judge=False)  # the scaffold
    run_all(s)
    head = [*prompt[-8:], 1, 2, 3]
    assert s.streams[sid].head == head
    response = list(range(2000, 2300))
    ticket = s.feed(sid, response)
    plans = run_all(s)
    assert ticket is not None and [r[0][0] for r in ticket.results] == [float(t) for t in response]
    restarts = [i for p in plans for i in p.items if i.start == 0]
    assert restarts and s.slides == len(restarts)
    first = restarts[0]
    keep = min(16, (s.streams[sid].capacity - len(head)) // 2)
    assert first.ids[: len(head)] == head
    assert first.kinds[: len(head)] == [NO_OUTPUT] * len(head)
    assert first.kinds[len(head) : len(head) + keep] == [CONTEXT] * keep
    # The replayed window is the newest judged tokens just before the slide, in order.
    replay = first.ids[len(head) : len(head) + keep]
    assert (
        replay == list(range(replay[0], replay[0] + keep)) and replay[-1] + 1 == first.ids[len(head) + keep]
    )


def test_close_during_a_step_frees_after_it() -> None:
    alloc = FakeAllocator()
    s = Scheduler(EngineLimits(), alloc)
    sid = s.add_stream([1, 2, 3], 2)
    t = s.feed(sid, [4, 5])
    plan = s.schedule()
    assert plan is not None
    dropped = s.close(sid)
    assert t in dropped and isinstance(t.error, StreamClosed)
    assert sid in s.streams  # still in use by the step
    s.complete(plan, outputs_for(plan))
    assert sid not in s.streams and s.kv.reserved == 0
    with pytest.raises(StreamClosed):
        s.feed(sid, [1])


def test_a_failed_step_kills_its_streams_only() -> None:
    s = Scheduler(EngineLimits(max_batch_streams=1), FakeAllocator())
    a = s.add_stream([1, 2, 3], 2)
    b = s.add_stream([1, 2, 3], 2)
    ta = s.feed(a, [4])
    plan = s.schedule()
    assert plan is not None and [i.sid for i in plan.items] == [a]
    failed = s.fail(plan, RuntimeError("CUDA out of memory"))
    assert ta in failed and isinstance(ta.error, GuardFailure)
    with pytest.raises(GuardFailure, match="out of memory"):
        s.feed(a, [5])
    tb = s.feed(b, [6])
    run_all(s)
    assert tb is not None and tb.done and tb.error is None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_retracted_tokens_never_get_verdicts_even_across_slides(data: st.DataObject) -> None:
    # A small context: streams grow and slide while tentative tokens come and go.
    lim = EngineLimits(
        max_streams=2,
        max_cached_tokens=1024,
        response_reserve=32,
        anchor_tokens=8,
        window_tokens=24,
        prefill_chunk=data.draw(st.integers(1, 32)),
        max_batch_tokens=data.draw(st.integers(1, 64)),
        max_positions=96,
    )
    s = Scheduler(lim, FakeAllocator())
    sid = s.add_stream(list(range(500, 520)), verdict_index=19)
    s.feed(sid, [1, 2], judge=False)
    tickets: list[tuple[Ticket, int]] = []
    kept_ids: list[int] = []
    next_id = 1000
    for _ in range(data.draw(st.integers(1, 40))):
        n = data.draw(st.integers(1, 6))
        ids = list(range(next_id, next_id + n))
        next_id += n
        t = s.feed(sid, ids)
        assert t is not None
        back = data.draw(st.integers(0, n)) if data.draw(st.booleans()) else 0
        when = data.draw(st.sampled_from(["now", "after a step", "in flight"]))
        if when == "after a step" and (plan := s.schedule()) is not None:
            s.complete(plan, outputs_for(plan))
            s.retract(sid, back)
        elif when == "in flight" and (plan := s.schedule()) is not None:
            s.retract(sid, back)
            # and again in the same step: a second guess, taken back as far as into the first
            more = list(range(next_id, next_id + 3))
            next_id += 3
            t2 = s.feed(sid, more)
            assert t2 is not None
            back2 = data.draw(st.integers(0, 3 + n - back))
            s.retract(sid, back2)
            s.complete(plan, outputs_for(plan))
            kept = n - back - max(0, back2 - 3)
            tickets.append((t, kept))
            kept_ids += ids[:kept]
            t, ids, n, back = t2, more, 3, min(back2, 3)
        else:
            s.retract(sid, back)
        tickets.append((t, n - back))
        kept_ids += ids[: n - back]
    run_all(s)
    got = [r[0][0] for t, kept in tickets for r in t.results[:kept]]
    assert got == [float(i) for i in kept_ids]
    assert all(t.done and len(t.results) >= kept for t, kept in tickets)
    # What the cache holds ends with the kept ids, in order (positions of taken-back ones reused).
    st_ = s.streams[sid]
    assert (
        list(st_.tail)[-min(len(st_.tail), len(kept_ids)) :] == kept_ids[-min(len(st_.tail), len(kept_ids)) :]
    )


def test_retract_in_flight_discards_its_verdicts_and_reuses_the_positions() -> None:
    s = Scheduler(EngineLimits(), FakeAllocator())
    sid = s.add_stream([1, 2, 3], 2)
    run_all(s)
    t = s.feed(sid, [10, 11, 12])
    plan = s.schedule()
    assert plan is not None and plan.items[0].start == 3
    done = s.retract(sid, 2)  # 11 and 12 are in the step in flight
    assert done == [] and t is not None and t.need == 1
    s.complete(plan, outputs_for(plan))
    assert t.done and [r[0][0] for r in t.results] == [10.0]
    t2 = s.feed(sid, [13])
    plan = s.schedule()
    assert plan is not None and plan.items[0].start == 4  # where 11 was
    s.complete(plan, outputs_for(plan))
    assert t2 is not None and [r[0][0] for r in t2.results] == [13.0]
    # Two retractions during one step: each discards only its own verdicts.
    t4 = s.feed(sid, [20, 21, 22])
    plan = s.schedule()
    assert plan is not None
    s.retract(sid, 1)  # 22
    t5 = s.feed(sid, [23])
    s.retract(sid, 2)  # 23 (pending) and 21 (in flight)
    s.complete(plan, outputs_for(plan))
    assert t4 is not None and t4.done and [r[0][0] for r in t4.results] == [20.0]
    assert t5 is not None and t5.done and t5.results == []
    # Everything pending taken back: the ticket is done at once, with no verdicts.
    t3 = s.feed(sid, [14, 15])
    assert s.retract(sid, 2) == [t3] and t3 is not None and t3.results == [] and not s.streams[sid].pend_ids
    with pytest.raises(EngineError):
        s.retract(sid, 50)  # more than was fed after the head


def test_a_full_pool_makes_streams_wait_never_slide_and_a_long_wait_fails() -> None:
    lim = EngineLimits(
        max_streams=4,
        max_cached_tokens=256,
        response_reserve=64,
        anchor_tokens=16,
        prefill_chunk=128,
        max_batch_tokens=256,
        max_positions=1024,
        memory_wait_s=5.0,
    )
    alloc = FakeAllocator()
    s = Scheduler(lim, alloc)
    a = s.add_stream(list(range(50)), 49)  # 128 positions reserved each
    b = s.add_stream(list(range(50)), 49)
    run_all(s)
    assert s.kv.reserved == 256
    ta = s.feed(a, list(range(1000, 1100)))  # needs to grow; the pool is full
    plan = s.schedule(now=1.0)
    assert plan is not None and [len(i.ids) for i in plan.items] == [78]  # what its capacity still holds
    s.complete(plan, outputs_for(plan))
    assert s.schedule(now=2.0) is None  # nothing more fits: it waits, it does not slide
    assert s.waiting_for_memory() and s.memory_waits == 1 and s.slides == 0
    assert not s.can_admit(16)  # live streams come before new ones
    assert s.next_expiry() == 7.0 and s.expire(now=6.9) == []
    # Room frees up: the waiting stream grows and finishes on the whole context.
    s.close(b)
    run_all(s)
    assert ta is not None and ta.done and ta.error is None and not s.waiting_for_memory()
    assert s.streams[a].cached == 150 and s.slides == 0
    # Another wait, this time too long: the stream fails with a guard failure and frees its memory.
    s.close(a)
    c, d = s.add_stream(list(range(50)), 49), s.add_stream(list(range(50)), 49)
    run_all(s)
    tc = s.feed(c, list(range(500)))
    while (plan := s.schedule(now=10.0)) is not None:
        s.complete(plan, outputs_for(plan))
    assert tc is not None and not tc.done and s.waiting_for_memory()
    assert (
        s.expire(now=15.0) == [tc] and isinstance(tc.error, GuardFailure) and "guard memory" in str(tc.error)
    )
    assert s.memory_timeouts == 1 and s.kv.reserved == s.streams[d].capacity == 128
    with pytest.raises(GuardFailure):
        s.feed(c, [1])
    s.close(c)
    assert c not in s.streams and s.can_admit(128)


# -- the next step scheduled while one is in flight (the engine's overlap) ----------------------------


def hand_outputs(items: list[Any]) -> list[ItemOutput]:
    for item in items:
        assert item.start + len(item.ids) <= item.kv.capacity, "a step would write past the cache"
    return outputs_for(StepPlan(items))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_verdicts_go_to_their_tokens_with_steps_in_flight(data: st.DataObject) -> None:
    """Two streams fed, retracted and stepped in any order, one step at a time or with the next
    scheduled before the one in flight completes: every kept token gets exactly its verdict, in order,
    through growth and slides; nothing is left reserved once both close."""
    lim = EngineLimits(
        max_streams=2,
        max_cached_tokens=1024,
        response_reserve=32,
        anchor_tokens=8,
        window_tokens=24,
        prefill_chunk=data.draw(st.integers(1, 32), label="chunk"),
        max_batch_tokens=data.draw(st.integers(1, 64), label="budget"),
        max_positions=96,
    )
    alloc = FakeAllocator()
    s = Scheduler(lim, alloc)
    pipeline = Pipeline(s, hand_outputs, depth=data.draw(st.sampled_from([1, 2]), label="depth"))
    sids = [s.add_stream(list(range(500, 520)), verdict_index=19) for _ in range(2)]
    for sid in sids:
        s.feed(sid, [1, 2], judge=False)
    feeds: dict[int, list[list[Any]]] = {sid: [] for sid in sids}  # [ticket, ids, kept]
    next_id = 1000
    for _ in range(data.draw(st.integers(1, 60), label="actions")):
        sid = data.draw(st.sampled_from(sids), label="stream")
        action = data.draw(st.sampled_from(["feed", "retract", "step"]), label="action")
        if action == "feed":
            ids = list(range(next_id, next_id + data.draw(st.integers(1, 6), label="n")))
            next_id += len(ids)
            feeds[sid].append([s.feed(sid, ids), ids, len(ids)])
        elif action == "retract" and feeds[sid] and feeds[sid][-1][2]:
            back = data.draw(st.integers(1, feeds[sid][-1][2]), label="back")
            s.retract(sid, back)
            feeds[sid][-1][2] -= back
        else:
            pipeline.step()
    pipeline.drain()
    assert s.in_flight == 0
    for sid in sids:
        got = [r[0][0] for t, _, kept in feeds[sid] for r in t.results[:kept]]
        assert got == [float(i) for _, ids, kept in feeds[sid] for i in ids[:kept]]
        assert all(t.done and len(t.results) >= kept for t, _, kept in feeds[sid])  # delivered stay
        s.close(sid)
    assert not s.streams and s.kv.reserved == 0 and not alloc.live


def test_a_stream_in_two_steps_in_flight_is_freed_after_the_last() -> None:
    alloc = FakeAllocator()
    s = Scheduler(EngineLimits(prefill_chunk=4), alloc)
    sid = s.add_stream(list(range(10)), 9)
    first, second = s.schedule(), s.schedule()  # the prompt in two chunks, both in flight
    assert first is not None and second is not None and s.in_flight == 2
    assert [(i.start, len(i.ids)) for p in (first, second) for i in p.items] == [(0, 4), (4, 4)]
    s.close(sid)
    s.complete(first, outputs_for(first))
    assert sid in s.streams and alloc.live  # the second step still writes its cache
    s.complete(second, outputs_for(second))
    assert sid not in s.streams and not alloc.live and s.kv.reserved == 0
    with pytest.raises(AssertionError, match="order"):
        s.complete(second, outputs_for(second))


def test_a_slide_waits_for_the_steps_in_flight() -> None:
    s = Scheduler(SLIDING, FakeAllocator())
    sid = s.add_stream(list(range(500, 520)), verdict_index=19)
    run_all(s)
    ticket = s.feed(sid, list(range(2000, 2140)))  # 20 + 140 = the whole context
    flying = s.schedule()
    assert flying is not None
    while (plan := s.schedule()) is not None:  # up to the end of the context, no slide while in flight
        assert all(i.start > 0 for i in plan.items)
        s.complete(flying, outputs_for(flying))
        flying = plan
    assert s.streams[sid].cached == 160 and s.slides == 0
    s.feed(sid, [3000])  # past the end: it slides once the step in flight lands
    assert s.schedule() is None and s.slides == 0
    s.complete(flying, outputs_for(flying))
    plan = s.schedule()
    assert plan is not None and plan.items[0].start == 0 and s.slides == 1
    s.complete(plan, outputs_for(plan))
    assert (
        ticket is not None
        and ticket.done
        and [r[0][0] for r in ticket.results] == [float(t) for t in range(2000, 2140)]
    )


def test_a_stream_failed_while_its_step_is_in_flight_gets_nothing_from_it() -> None:
    lim = EngineLimits(max_cached_tokens=256, response_reserve=64, anchor_tokens=16, memory_wait_s=1.0)
    s = Scheduler(lim, FakeAllocator())
    a, b = s.add_stream(list(range(50)), 49), s.add_stream(list(range(50)), 49)
    run_all(s)
    ta = s.feed(a, list(range(1000, 1100)))
    first = s.schedule(now=0.0)  # what a's capacity still holds, in flight
    assert first is not None and s.schedule(now=0.0) is None and s.waiting_for_memory()
    assert s.expire(now=2.0) == [ta]  # the wait ran out while the step was in flight
    assert s.complete(first, outputs_for(first)) == [] and ta is not None and ta.results == []
    s.close(a)
    assert s.kv.reserved == s.streams[b].capacity


class CachingAllocator(FakeAllocator):
    """Records which page indexes of which handle joined the prefix cache."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: list[int] = []

    def register(self, handle: FakeKV, index: int, key: bytes) -> None:
        self.registered.append(index)


def test_only_pages_computed_by_completed_steps_join_the_cache() -> None:
    """With the next step in flight when one completes, the pages that step writes are not cached yet:
    if it fails, nothing it should have computed is ever shared."""
    alloc = CachingAllocator()
    s = Scheduler(EngineLimits(prefill_chunk=16), alloc)
    s.add_stream(list(range(100, 148)), None)  # three full pages, no verdict: all may be cached
    first, second = s.schedule(), s.schedule()
    assert first is not None and second is not None
    assert [i.start for p in (first, second) for i in p.items] == [0, 16]
    s.complete(first, outputs_for(first))
    assert alloc.registered == [0]  # page 1 is the second step's
    s.fail(second, RuntimeError("device error"))
    assert alloc.registered == [0]
