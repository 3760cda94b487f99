"""Engine parity and behaviour on real (tiny) checkpoints loaded through the production path.

Parity: whatever the chunking of prompts and responses, the token budget, the interleaving of up to
16 streams, and tentative tokens taken back (before, after or during the step that judges them), every
verdict equals the one a single full-sequence forward gives for the ids that stay.
Tolerance: 1e-9 in float64 (the packed path and transformers' forward differ only by summation
order), 2e-5 in float32; arg-max verdicts identical.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.config import ConfigError, load_settings
from guardproxy.guard.attention import decode_groups
from guardproxy.guard.engine import GuardEngine, overlap_for
from guardproxy.guard.errors import EngineOverloaded, GuardFailure, PromptTooLong
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.pages import PAGE_SIZE, PagePool
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import Scheduler, Ticket
from guardproxy.guard.template import ChatTemplate, GuardPrompt
from guardproxy.server.engines import local_engine

from ..conftest import scaffold
from .pipeline import Pipeline

WORDS = [
    "the",
    "cake",
    "flour",
    "how",
    "do",
    "I",
    "bake",
    "a",
    "river",
    "über",
    "日本語",
    "😀",
    "?",
    "\n",
    "ok",
]


@pytest.fixture(scope="module")
def model64(random_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(random_checkpoint, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def context(template: ChatTemplate) -> list[int]:
    return scaffold(template)


def reference(
    model: Qwen3GuardStream, prompt: GuardPrompt, context: list[int], response: list[int]
) -> tuple[Any, Any]:
    ids = torch.tensor([[*prompt.ids, *context, *response]])
    with torch.no_grad():
        out = model(ids)
    start = len(prompt.ids) + len(context)
    return out.query.risk[0, prompt.verdict_index], out.response.risk[0, start:]


def conversations() -> st.SearchStrategy[list[dict[str, str]]]:
    text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
    turn = st.tuples(text, text)
    return st.tuples(st.lists(turn, max_size=2), text).map(
        lambda t: (
            [
                m
                for u, a in t[0]
                for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
            ]
            + [{"role": "user", "content": t[1]}]
        )
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(data=st.data())
def test_any_chunking_and_interleaving_matches_a_full_forward(
    model64: Qwen3GuardStream, template: ChatTemplate, context: list[int], data: st.DataObject
) -> None:
    limits = EngineLimits(
        max_batch_tokens=data.draw(st.integers(1, 160), label="budget"),
        max_batch_streams=data.draw(st.integers(1, 16), label="stream budget"),
        prefill_chunk=data.draw(st.integers(1, 64), label="chunk"),
        max_cached_tokens=16 * 1024,
        response_reserve=data.draw(st.sampled_from([16, 64, 512]), label="reserve"),  # small: growth runs
        anchor_tokens=256,
        window_tokens=1024,
    )
    # Each attention backend. No slack splits streams of different lengths into separate calls more
    # often; for ``reference``, a huge gather limit batches every group of one-token streams, 0 makes
    # each attend alone.
    runner = ModelRunner(
        model64,
        attention=data.draw(st.sampled_from(["batched", "reference"]), label="attention"),
        pad_slack=data.draw(st.sampled_from([0, 256]), label="pad slack"),
        gather_max=data.draw(st.sampled_from([1 << 40, 0, 5000]), label="gather max"),
    )
    scheduler = Scheduler(limits, PagePool(cache_pages=limits.prefix_cache_tokens // PAGE_SIZE))
    n = data.draw(st.integers(1, 16), label="streams")
    prompts = [template.render_prompt(data.draw(conversations())) for _ in range(n)]
    responses = [data.draw(st.lists(st.integers(0, 151642), max_size=40)) for _ in range(n)]
    chunks: list[list[list[int]]] = []
    for r in responses:
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(r) - 1)), max_size=8))) if r else []
        bounds = [0, *cuts, len(r)]
        chunks.append([r[a:b] for a, b in itertools.pairwise(bounds) if b > a])

    sids, prompt_tickets = [], []
    for p in prompts:
        sid = scheduler.add_stream(p.ids, p.verdict_index, p.anchor_start)
        prompt_tickets.append(scheduler.streams[sid].prompt_ticket)
        scheduler.feed(sid, context, judge=False)
        sids.append(sid)
    # Per stream: (ticket, how many of its verdicts count): the kept ids are ``final``.
    tickets: list[list[tuple[Ticket, int]]] = [[] for _ in range(n)]
    final: list[list[int]] = [[] for _ in range(n)]

    # One step at a time, or (the engine's overlap) the next scheduled while one is in flight.
    pipeline = Pipeline(scheduler, runner.execute, depth=data.draw(st.sampled_from([1, 2]), label="depth"))
    step = pipeline.step

    # A random interleaving of feeds (each stream in its own order) and engine steps; now and then a
    # tentative chunk that is partly or wholly taken back.
    while any(chunks):
        if data.draw(st.booleans(), label="step now"):
            step()
        k = data.draw(st.sampled_from([i for i in range(n) if chunks[i]]), label="which stream")
        if data.draw(st.integers(0, 3), label="tentative?") == 0:
            guess = data.draw(st.lists(st.integers(0, 151642), min_size=1, max_size=4), label="tentative")
            t = scheduler.feed(sids[k], guess)
            back = data.draw(st.integers(0, len(guess)), label="taken back")
            when = data.draw(st.sampled_from(["now", "after a step", "in flight"]), label="when")
            was_done = False

            def take_back(k: int = k, back: int = back) -> None:
                scheduler.retract(sids[k], back)

            if when == "now":
                take_back()
            elif when == "after a step":
                step()
                was_done = t is not None and t.done
                take_back()
            elif not step(take_back):
                take_back()
            assert t is not None
            kept = len(guess) - back
            if not was_done:  # verdicts of taken-back tokens not yet handed out never are
                step_until = 0
                while not t.done and step_until < 10_000:
                    step()
                    step_until += 1
                assert len(t.results) == kept
            tickets[k].append((t, kept))
            final[k] += guess[:kept]
        chunk = chunks[k].pop(0)
        t = scheduler.feed(sids[k], chunk)
        assert t is not None
        tickets[k].append((t, len(chunk)))
        final[k] += chunk
    pipeline.drain()

    for k in range(n):
        ref_q, ref_r = reference(model64, prompts[k], context, final[k])
        pt = prompt_tickets[k]
        assert pt is not None and pt.done
        got_q = torch.tensor(pt.results[0][0], dtype=torch.float64)
        torch.testing.assert_close(got_q, ref_q, atol=1e-9, rtol=0)
        got = [r[0] for t, kept in tickets[k] for r in t.results[:kept]]
        assert len(got) == len(final[k])
        if got:
            got_r = torch.tensor(got, dtype=torch.float64)
            torch.testing.assert_close(got_r, ref_r, atol=1e-9, rtol=0)
            assert torch.equal(got_r.argmax(-1), ref_r.argmax(-1))


@pytest.mark.parametrize("attention", ["batched", "reference"])
def test_one_token_streams_of_any_length_batch_and_reuse_pages(
    model64: Qwen3GuardStream, template: ChatTemplate, context: list[int], attention: str
) -> None:
    """Streams of very different lengths judging one token each per step: the attention splits them
    into groups (no slack), pads and masks the shorter ones, and a stream opened on the pages of
    closed ones (stale keys and values in them) still matches a full forward."""
    rng = random.Random(3)
    limits = EngineLimits(max_cached_tokens=4096, response_reserve=32, anchor_tokens=256, prefill_chunk=512)
    runner = ModelRunner(model64, attention=attention, pad_slack=0, gather_max=1 << 40)  # groups gathered
    scheduler = Scheduler(limits, PagePool())  # no cache: freed pages go straight back to the pool

    def open_stream(words: int) -> tuple[int, GuardPrompt]:
        prompt = template.render_prompt([{"role": "user", "content": " ".join(rng.choices(WORDS, k=words))}])
        sid = scheduler.add_stream(prompt.ids, prompt.verdict_index, prompt.anchor_start)
        scheduler.feed(sid, context, judge=False)
        return sid, prompt

    def judge_in_lockstep(streams: list[tuple[int, GuardPrompt]], n: int) -> None:
        while (plan := scheduler.schedule()) is not None:  # prefill
            scheduler.complete(plan, runner.execute(plan.items))
        for _ in range(n):
            plan_ids = {sid: [rng.randrange(151643)] for sid, _ in streams}
            tickets = [scheduler.feed(sid, plan_ids[sid]) for sid, _ in streams]
            plan = scheduler.schedule()
            assert plan is not None and all(len(item.ids) == 1 for item in plan.items)
            splits.append(len(decode_groups([item.start + 1 for item in plan.items], 0)))
            scheduler.complete(plan, runner.execute(plan.items))
            for (sid, _), t in zip(streams, tickets, strict=True):
                assert t is not None and t.done
                fed[sid] += plan_ids[sid]
                got[sid] += [r[0] for r in t.results]

    def check(streams: list[tuple[int, GuardPrompt]]) -> None:
        for sid, prompt in streams:
            _, ref_r = reference(model64, prompt, context, fed[sid])
            torch.testing.assert_close(torch.tensor(got[sid], dtype=torch.float64), ref_r, atol=1e-9, rtol=0)

    fed: dict[int, list[int]] = collections.defaultdict(list)
    got: dict[int, list[Any]] = collections.defaultdict(list)
    splits: list[int] = []
    first = [open_stream(w) for w in (150, 1, 2, 60, 3, 1)]
    judge_in_lockstep(first, 6)
    check(first)
    assert max(splits) > 1  # the lengths forced more than one group
    pages = runner.pool_positions
    for sid, _ in first[:4]:
        scheduler.close(sid)
    second = [open_stream(w) for w in (2, 120)] + first[4:]
    judge_in_lockstep(second, 5)
    check(second)
    assert runner.pool_positions == pages  # the new streams live on the freed pages


@pytest.mark.parametrize("overlap", [False, True])
async def test_async_engine_concurrent_streams_match_in_fp32(
    random_model: Qwen3GuardStream, template: ChatTemplate, context: list[int], overlap: bool
) -> None:
    rng = random.Random(7)
    limits = EngineLimits(max_batch_tokens=96, prefill_chunk=32, response_reserve=64, anchor_tokens=256)

    async def one(engine: GuardEngine, k: int) -> None:
        messages = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randrange(1, 40)))}]
        prompt = template.render_prompt(messages)
        response = [rng.randrange(151643) for _ in range(rng.randrange(1, 80))]
        async with await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as stream:
            stream.feed_context(context)
            pv = await stream.prompt_verdict()
            verdicts = []
            i = 0
            while i < len(response):
                step = rng.randrange(1, 9)
                verdicts += await stream.judge(response[i : i + step])
                i += step
        ref_q, ref_r = reference(random_model, prompt, context, response)
        torch.testing.assert_close(torch.tensor(pv.risk_probs), ref_q, atol=2e-5, rtol=0)
        got = torch.tensor([v.risk_probs for v in verdicts])
        torch.testing.assert_close(got, ref_r, atol=2e-5, rtol=0)
        top2 = ref_r.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # a near-tie may flip by rounding; no others may
        assert torch.equal(got.argmax(-1)[clear], ref_r.argmax(-1)[clear])
        assert [v.risk for v in verdicts] == [
            random_model.labels.response.risk[int(i)] for i in got.argmax(-1)
        ]

    async with GuardEngine(random_model, limits, overlap=overlap) as engine:
        await asyncio.gather(*(one(engine, k) for k in range(16)))
        stats = engine.stats()
        assert stats.active_streams == 0 and stats.reserved_tokens == 0 and stats.cached_tokens == 0


class Spy:
    """A step executor that records where each step runs, then runs it on the model (or fails the
    ``fail``-th one, as an out-of-memory would)."""

    def __init__(self, model: Qwen3GuardStream, fail: int = 0) -> None:
        self.runner = ModelRunner(model)
        self.labels, self.max_positions = self.runner.labels, self.runner.max_positions
        self.threads: list[str] = []
        self.fail = fail
        self.closed = False

    def execute(self, items: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        if len(self.threads) == self.fail:
            raise RuntimeError("simulated out of memory")
        return self.runner.execute(items)

    def close(self) -> None:
        self.closed = True


class Gate(Spy):
    """A Spy whose first step waits on the engine thread until the test opens the gate, and that
    records each step's page tables when it starts and when it ends."""

    def __init__(self, model: Qwen3GuardStream, fail: int = 0) -> None:
        super().__init__(model, fail)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.tables: list[tuple[list[list[int]], list[list[int]]]] = []

    def execute(self, items: Any) -> Any:
        before = [list(item.kv.pages) for item in items]
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        try:
            return super().execute(items)
        finally:
            self.tables.append((before, [list(item.kv.pages) for item in items]))


async def entered(gate: Gate) -> None:
    """Until the gate's first step is running on the engine thread (at most 10 seconds)."""
    assert await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 10), "no step started"


def second_step_scheduled(engine: GuardEngine) -> asyncio.Event:
    """An event set when the engine has two steps in flight (it wraps the scheduler's ``schedule``)."""
    event = asyncio.Event()
    schedule = engine.scheduler.schedule

    def watched(now: float = 0.0) -> Any:
        plan = schedule(now)
        if engine.scheduler.in_flight == 2:
            event.set()
        return plan

    engine.scheduler.schedule = watched  # type: ignore[method-assign]
    return event


async def test_with_overlap_the_next_step_is_scheduled_while_one_runs(
    random_model: Qwen3GuardStream,
) -> None:
    """While the first step runs, the engine schedules the next (it grows the stream's pages) and
    queues it; the running step keeps the page table it was scheduled with."""
    gate = Gate(random_model)
    limits = EngineLimits(response_reserve=16, anchor_tokens=16, prefill_chunk=512)
    async with GuardEngine(gate, limits, overlap=True) as engine:
        second = second_step_scheduled(engine)
        stream = await engine.open(list(range(10, 20)), 9)
        await entered(gate)
        more = stream.feed(list(range(100, 160)))  # past its 32 positions: the next step grows it
        await asyncio.wait_for(second.wait(), 10)
        assert len(engine.scheduler.streams[stream.sid].kv.pages) > 2
        gate.gate.set()
        assert len(await asyncio.wait_for(more, 10)) == 60
        await stream.prompt_verdict()
    first_before, first_after = gate.tables[0]
    assert first_before == first_after == [[first_before[0][0], first_before[0][1]]]


@pytest.mark.parametrize("overlap", [False, True])
async def test_a_failed_step_fails_its_streams_and_the_step_queued_behind_it(
    random_model: Qwen3GuardStream, overlap: bool
) -> None:
    gate = Gate(random_model, fail=1)
    async with GuardEngine(gate, overlap=overlap) as engine:
        second = second_step_scheduled(engine)
        doomed = await engine.open([1, 2, 3], 2)
        await entered(gate)
        behind = await engine.open([4, 5, 6], 2)
        if overlap:
            await asyncio.wait_for(second.wait(), 10)
        gate.gate.set()
        with pytest.raises(GuardFailure, match="simulated out of memory"):
            await doomed.prompt_verdict()
        if overlap:  # it was queued behind the failure: its streams may depend on it, it never ran
            with pytest.raises(GuardFailure, match="simulated out of memory"):
                await behind.prompt_verdict()
        else:  # scheduled after the failure: it runs
            await behind.prompt_verdict()
        assert len(gate.threads) == 2 - overlap
        doomed.close()
        behind.close()
        async with await engine.open([1, 2, 3], 2) as fresh:
            await fresh.prompt_verdict()
            assert len(await fresh.judge([4, 5])) == 2
        # Every step has landed: a closed stream's memory is freed at once.
        assert engine.stats().active_streams == 0 and engine.stats().reserved_tokens == 0


async def test_forward_runs_in_the_worker_thread_not_the_loop(random_model: Qwen3GuardStream) -> None:
    spy = Spy(random_model)
    async with GuardEngine(spy) as engine, await engine.open([1, 2, 3], 2) as stream:
        await stream.prompt_verdict()
        await stream.judge([4, 5, 6])
    assert spy.threads and all(name.startswith("guard-engine") for name in spy.threads)
    assert threading.current_thread().name not in spy.threads
    assert spy.closed  # the engine owns its executor


async def test_full_engine_queues_then_refuses(random_model: Qwen3GuardStream) -> None:
    limits = EngineLimits(
        max_streams=2, max_queue=1, queue_timeout_s=5.0, response_reserve=64, anchor_tokens=64
    )
    async with GuardEngine(random_model, limits) as engine:
        a = await engine.open([1, 2, 3], 2)
        await engine.open([1, 2, 3], 2)
        waiting = asyncio.create_task(engine.open([1, 2, 3], 2), name="third-open")
        await asyncio.sleep(0.01)
        assert not waiting.done() and engine.stats().queued_streams == 1
        with pytest.raises(EngineOverloaded) as refused:
            await engine.open([1, 2, 3], 2)
        assert refused.value.retry_after >= 1.0
        a.close()  # room: the queued opener gets it
        c = await asyncio.wait_for(waiting, 5)
        assert (await c.judge([9]))[0].risk in random_model.labels.response.risk
        assert engine.stats().active_streams == 2


async def test_queue_wait_times_out_as_overload(random_model: Qwen3GuardStream) -> None:
    limits = EngineLimits(max_streams=1, queue_timeout_s=0.05, response_reserve=64, anchor_tokens=64)
    async with GuardEngine(random_model, limits) as engine:
        await engine.open([1, 2], 1)
        with pytest.raises(EngineOverloaded, match="waited"):
            await engine.open([1, 2], 1)
        assert engine.stats().queued_streams == 0


async def test_prompt_that_can_never_fit_is_refused(random_model: Qwen3GuardStream) -> None:
    async with GuardEngine(
        random_model, EngineLimits(max_cached_tokens=2048, response_reserve=512)
    ) as engine:
        with pytest.raises(PromptTooLong, match="exceeds"):
            await engine.open([1] * 1600, 1599)


async def test_engine_recovers_after_a_failed_forward(random_model: Qwen3GuardStream) -> None:
    async with GuardEngine(Spy(random_model, fail=1)) as engine:
        doomed = await engine.open([1, 2, 3], 2)
        with pytest.raises(GuardFailure, match="simulated out of memory"):
            await doomed.prompt_verdict()
        doomed.close()
        async with await engine.open([1, 2, 3], 2) as fresh:
            await fresh.prompt_verdict()
            assert len(await fresh.judge([4, 5])) == 2
        assert engine.stats().active_streams == 0


@pytest.mark.parametrize("overlap", [False, True])
async def test_an_internal_error_fails_live_streams_instead_of_hanging(
    random_model: Qwen3GuardStream, overlap: bool
) -> None:
    async with GuardEngine(random_model, overlap=overlap) as engine:
        original = engine.scheduler.schedule
        broken = {"once": True}

        def schedule(now: float = 0.0) -> Any:
            if broken.pop("once", False):
                raise KeyError("bookkeeping bug")
            return original(now)

        engine.scheduler.schedule = schedule  # type: ignore[method-assign]
        victim = await engine.open([1, 2, 3], 2)
        with pytest.raises(GuardFailure, match="bookkeeping bug"):
            await asyncio.wait_for(victim.prompt_verdict(), 5)
        victim.close()
        async with await engine.open([1, 2, 3], 2) as fresh:
            assert (await asyncio.wait_for(fresh.prompt_verdict(), 5)).risk in random_model.labels.query.risk


@pytest.mark.parametrize("overlap", [False, True])
async def test_closing_mid_feed_fails_the_waiter_and_frees(
    random_model: Qwen3GuardStream, overlap: bool
) -> None:
    async with GuardEngine(random_model, overlap=overlap) as engine:
        stream = await engine.open([1, 2, 3], 2)
        pending = stream.feed(list(range(100, 400)))
        stream.close()
        with pytest.raises(Exception, match="closed"):
            await pending
        await asyncio.sleep(0.05)
        assert engine.stats().reserved_tokens == 0


@pytest.mark.parametrize("overlap", [False, True])
async def test_a_stream_waits_for_memory_instead_of_sliding(
    random_model: Qwen3GuardStream, overlap: bool
) -> None:
    """Verdicts never depend on load: with the pool full a stream waits (no slide), goes on when room
    frees up, and fails as a guard failure only after ``memory_wait_s``."""
    limits = EngineLimits(
        max_cached_tokens=256, response_reserve=64, anchor_tokens=16, max_positions=1024, memory_wait_s=0.3
    )
    async with GuardEngine(random_model, limits, overlap=overlap) as engine:
        a = await engine.open(list(range(10, 60)), 49)
        b = await engine.open(list(range(10, 60)), 49)
        grows = a.feed(list(range(1000, 1100)))  # past its 128 positions: the pool has none left
        deadline = asyncio.get_running_loop().time() + 5
        while engine.stats().memory_waits == 0:
            assert asyncio.get_running_loop().time() < deadline, "never waited"
            await asyncio.sleep(0.01)
        assert not grows.done() and engine.stats().slides == 0
        b.close()  # room: the waiting stream is woken and finishes on its whole context
        assert len(await asyncio.wait_for(grows, 5)) == 100
        assert engine.stats().slides == 0 and engine.stats().memory_timeouts == 0
        a.close()
        c = await engine.open(list(range(10, 60)), 49)
        d = await engine.open(list(range(10, 60)), 49)
        starved = c.feed(list(range(2000, 2400)))  # d holds the rest of the pool and stays open
        with pytest.raises(GuardFailure, match="guard memory"):
            await asyncio.wait_for(starved, 5)  # the engine wakes for the deadline by itself
        assert engine.stats().memory_timeouts == 1
        assert len(await d.judge([7, 8])) == 2  # the others go on
        c.close()
        d.close()
        assert engine.stats().reserved_tokens == 0


async def test_overlap_is_on_by_default_on_a_gpu_only_and_set_from_the_settings(
    random_checkpoint: Path,
) -> None:
    assert overlap_for("auto", torch.device("cuda")) and overlap_for("on", torch.device("cpu"))
    assert not overlap_for("auto", torch.device("cpu")) and not overlap_for("off", torch.device("cuda"))
    with pytest.raises(ConfigError, match="overlap must be auto, on or off"):
        load_settings({"guard": {"overlap": "yes"}})
    guard = {"model": str(random_checkpoint), "process": False, "device": "cpu"}
    for setting, expected in (("auto", False), ("on", True)):
        engine, template = await local_engine(load_settings({"guard": {**guard, "overlap": setting}}))
        async with engine:
            assert engine.overlap is expected
            prompt = template.render_prompt([{"role": "user", "content": "hello"}])
            async with await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start) as stream:
                assert len(await stream.judge([1, 2, 3])) == 3
