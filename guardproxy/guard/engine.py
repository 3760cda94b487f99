"""The guard engine: many concurrent guard streams, judged by continuous batching.

``GuardEngine`` is the asyncio side. A single loop task asks the scheduler for the next step, runs it
from a dedicated worker thread (the event loop never blocks on a forward pass) on its ``StepExecutor``
(``ModelRunner``: the model in this process; ``GuardWorker``: the model in the guard's own process), and
resolves the futures of the feeds whose tokens were judged. Opening a stream waits in a bounded FIFO
queue when the engine is full, and raises ``EngineOverloaded`` when the queue is full or the wait times
out.

    async with GuardEngine(model, limits) as engine:        # or GuardEngine(GuardWorker(path), limits)
        prompt = template.render_prompt(messages)
        stream = await engine.open(prompt.ids, prompt.verdict_index, prompt.anchor_start)
        prompt_verdict = await stream.prompt_verdict()
        stream.feed_context(context_ids)                     # what the guard reads but does not judge
        verdicts = await stream.judge(response_token_ids)
        stream.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import TracebackType
from typing import Any, Protocol

import torch

from guardproxy.aio import cancel_and_wait
from guardproxy.guard.api import EngineStats
from guardproxy.guard.errors import EngineError, EngineOverloaded, GuardFailure, StreamClosed
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream
from guardproxy.guard.model_process import WorkerDied
from guardproxy.guard.pages import PAGE_SIZE, PagePool
from guardproxy.guard.runner import ModelRunner
from guardproxy.guard.scheduler import (
    ItemOutput,
    RawProbs,
    Scheduler,
    StepPlan,
    Ticket,
    WorkItem,
)
from guardproxy.guard.verdict import GuardLabels, HeadLabels, Verdict

log = logging.getLogger(__name__)


def max_pages(limits: EngineLimits) -> int:
    """KV pages the engine may need: the scheduler never reserves more than max_cached_tokens, and a
    stream's last page may be part empty, hence one more page each."""
    return -(-limits.max_cached_tokens // PAGE_SIZE) + limits.max_streams


def overlap_for(setting: str, device: torch.device) -> bool:
    """``guard.overlap``: on, off, or auto: on a GPU, where the device runs a step while the host
    schedules the next. On a CPU the host and the step share the cores (and the GIL for the model's
    Python): bench/engine.py measured it 0.9-1.0x there."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _quiet(fut: asyncio.Future[Any]) -> None:
    # A caller that closes a stream without awaiting its futures has chosen not to care about their
    # errors: mark them retrieved so asyncio does not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class _Skipped(Exception):
    """A step queued behind one that failed, not run."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"not run: the step before it failed ({cause!r})")
        self.cause = cause


class StepExecutor(Protocol):
    """Runs the engine's steps on the guard model: ``ModelRunner`` in this process, ``GuardWorker`` in
    the guard's own process, or a test's stand-in (one that fails, say). ``execute`` is called from the
    engine's worker thread, one step at a time; ``close`` when the engine stops."""

    @property
    def labels(self) -> GuardLabels: ...

    @property
    def max_positions(self) -> int: ...

    def execute(self, items: Sequence[WorkItem]) -> list[ItemOutput]: ...

    def close(self) -> None: ...


class GuardStream:
    """One conversation's guard state. Feed response tokens in order; each gets a verdict."""

    def __init__(self, engine: GuardEngine, sid: int, prompt: asyncio.Future[list[RawProbs]] | None) -> None:
        self._engine = engine
        self.sid = sid
        self._prompt = prompt
        self.closed = False

    async def prompt_verdict(self) -> Verdict:
        if self._prompt is None:
            raise EngineError("this stream was opened without a prompt verdict position")
        raw = await asyncio.shield(self._prompt)
        return self._engine._verdict(raw[0], self._engine.labels.query)

    def feed(self, ids: Sequence[int]) -> asyncio.Future[list[Verdict]]:
        """Queue tokens to judge; the future resolves with one verdict per token, in order."""
        return self._engine._feed(self, ids, judge=True)

    async def judge(self, ids: Sequence[int]) -> list[Verdict]:
        return await self.feed(ids)

    def feed_context(self, ids: Sequence[int]) -> None:
        """Queue tokens the guard must read but whose verdicts are not wanted (markup, scaffold)."""
        self._engine._feed(self, ids, judge=False)

    def retract(self, n: int) -> None:
        """Take back the last ``n`` judged tokens fed (see ``Scheduler.retract``): the futures of their
        feeds resolve without their verdicts."""
        if self.closed or n <= 0:
            return
        try:
            done = self._engine.scheduler.retract(self.sid, n)
        except (StreamClosed, GuardFailure):
            return  # the futures of its feeds carry that already
        self._engine._resolve(done)

    def close(self) -> None:
        """Free the stream's memory (now, or after the step using it). Idempotent."""
        if not self.closed:
            self.closed = True
            self._engine._close(self)

    async def __aenter__(self) -> GuardStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class GuardEngine:
    def __init__(
        self,
        executor: StepExecutor | Qwen3GuardStream,
        limits: EngineLimits | None = None,
        *,
        threads: int | None = None,
        attention: str = "auto",
        overlap: bool = False,
        on_step: Callable[[int, int, float], None] | None = None,
        on_batch: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        """Steps run on ``executor`` (a model is run here, by a ``ModelRunner`` with the ``attention``
        backend). The engine owns the executor from now on and closes it on ``stop``. ``overlap``: the
        next step is scheduled while one runs (one step in flight, the next queued behind it)."""
        if threads is not None:
            torch.set_num_threads(threads)
        if limits is None:
            max_positions = (
                int(executor.config.max_position_embeddings)
                if isinstance(executor, Qwen3GuardStream)
                else executor.max_positions
            )
            limits = EngineLimits(max_positions=max_positions)
        if isinstance(executor, Qwen3GuardStream):
            executor = ModelRunner(executor, max_pages=max_pages(limits), attention=attention)
        self.executor: StepExecutor = executor
        self.labels = executor.labels
        if limits.max_positions > executor.max_positions:
            raise ValueError(
                f"engine.max_positions {limits.max_positions} > the model's {executor.max_positions}"
            )
        self.limits = limits
        # The engine hands out page ids; the executor holds the tensors (here or in its own process).
        cache = limits.prefix_cache_tokens // PAGE_SIZE if limits.prefix_cache else 0
        self.pages = PagePool(max_pages(limits), cache_pages=cache)
        self.scheduler = Scheduler(limits, self.pages)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard-engine")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._last_step = (0, 0.0)
        self._depth = 2 if overlap else 1  # steps submitted to the thread at once
        self._broken: BaseException | None = None  # set by the thread when a step fails
        self._promised = (0, 0)  # (KV positions, streams) admitted from the queue, not yet added
        self._on_step = on_step  # (tokens, streams, seconds) after every step, for metrics
        self._on_batch = on_batch  # the stream ids of every step (the shared engine: whose they are)

    @property
    def overlap(self) -> bool:
        return self._depth > 1

    @property
    def max_prompt_tokens(self) -> int:
        return self.limits.max_prompt_tokens

    @property
    def ready(self) -> bool:
        return self._task is not None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="guard-engine-loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for sid in list(self.scheduler.streams):
            self._resolve(self.scheduler.close(sid))
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(EngineOverloaded("guard engine stopped"))
        # Wait for a step that may still be running in the worker before tearing it down.
        await asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)
        await asyncio.get_running_loop().run_in_executor(None, self.executor.close)

    async def __aenter__(self) -> GuardEngine:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            active_streams=len(s.streams),
            queued_streams=len(self._waiters),
            cached_tokens=s.cached_tokens(),
            reserved_tokens=s.kv.reserved,
            steps=s.steps,
            slides=s.slides,
            memory_waits=s.memory_waits,
            memory_timeouts=s.memory_timeouts,
            prefill_tokens=s.prefill_tokens,
            prefix_hit_tokens=s.kv.prefix_hit_tokens,
            cached_pages=self.pages.cached_pages,
            evictions=self.pages.evictions,
            last_step_tokens=self._last_step[0],
            last_step_s=self._last_step[1],
        )

    # -- streams -------------------------------------------------------------------------------------

    async def open(
        self, prompt_ids: Sequence[int], verdict_index: int | None, anchor_start: int = 0
    ) -> GuardStream:
        """Start a stream with its prompt (prefilled in chunks by the next steps).

        Waits for room in FIFO order; raises ``EngineOverloaded`` when the queue is full or the wait
        exceeds ``queue_timeout_s``, ``PromptTooLong`` when the prompt can never fit."""
        if self._task is None:
            raise EngineError("guard engine is not started")
        cost = self.scheduler.cost(len(prompt_ids))
        if self._waiters or not self.scheduler.can_admit(cost, *self._promised):
            await self._wait_for_room(cost)
            self._promised = (self._promised[0] - cost, self._promised[1] - 1)
        sid = self.scheduler.add_stream(prompt_ids, verdict_index, anchor_start)
        self._admit_waiters()
        state = self.scheduler.streams[sid]
        fut: asyncio.Future[list[RawProbs]] | None = None
        if state.prompt_ticket is not None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_quiet)
            state.prompt_ticket.waiter = fut
        self._kick()
        return GuardStream(self, sid, fut)

    async def _wait_for_room(self, cost: int) -> None:
        """Queue until ``_admit_waiters`` promises room (returns with the promise held) or give up."""
        if len(self._waiters) >= self.limits.max_queue:
            raise EngineOverloaded(
                f"guard engine is full ({len(self.scheduler.streams)} streams, {len(self._waiters)} queued)",
                retry_after=self._retry_after(),
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.limits.queue_timeout_s)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # admitted in the same instant: take the room
            fut.cancel()
            raise EngineOverloaded(
                f"waited {self.limits.queue_timeout_s:g}s for room in the guard engine",
                retry_after=self._retry_after(),
            ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():  # promised, but the opener went away: give it back
                self._promised = (self._promised[0] - cost, self._promised[1] - 1)
            fut.cancel()
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            self._admit_waiters()  # whoever was behind us may fit now

    def _retry_after(self) -> float:
        # A rough hint: a few steps' worth of time, at least a second.
        return max(1.0, round(self._last_step[1] * 4, 1))

    def _admit_waiters(self) -> None:
        # FIFO: the head of the queue goes first and nobody overtakes it. Room handed to an opener
        # that has not run yet is counted in ``_promised`` so it is never handed out twice.
        while self._waiters:
            cost, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self.scheduler.can_admit(cost, *self._promised):
                return
            self._waiters.popleft()
            self._promised = (self._promised[0] + cost, self._promised[1] + 1)
            fut.set_result(None)

    def _feed(self, stream: GuardStream, ids: Sequence[int], *, judge: bool) -> asyncio.Future[list[Verdict]]:
        loop = asyncio.get_running_loop()
        out: asyncio.Future[list[Verdict]] = loop.create_future()
        out.add_done_callback(_quiet)
        if stream.closed:
            out.set_exception(StreamClosed(f"guard stream {stream.sid} is closed"))
            return out
        try:
            ticket = self.scheduler.feed(stream.sid, ids, judge=judge)
        except EngineError as exc:
            out.set_exception(exc)
            return out
        if ticket is None or ticket.done:
            out.set_result([])
        else:
            ticket.waiter = (out, self.labels.response)
        self._kick()
        return out

    def _close(self, stream: GuardStream) -> None:
        self._resolve(self.scheduler.close(stream.sid))
        self._admit_waiters()
        self._kick()  # a stream waiting for memory may fit now

    def _verdict(self, raw: RawProbs, labels: HeadLabels) -> Verdict:
        return Verdict(risk_probs=raw[0], category_probs=raw[1], labels=labels)

    # -- the loop ------------------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _resolve(self, tickets: Sequence[Ticket]) -> None:
        for t in tickets:
            waiter: Any = t.waiter
            if waiter is None:
                continue
            if isinstance(waiter, tuple):  # a response feed: (future, labels)
                fut, labels = waiter
                if fut.done():
                    continue
                if t.error is not None:
                    fut.set_exception(t.error)
                else:
                    fut.set_result([self._verdict(r, labels) for r in t.results])
            elif not waiter.done():  # the prompt verdict
                if t.error is not None:
                    waiter.set_exception(t.error)
                else:
                    waiter.set_result(t.results)

    def _execute(self, items: Sequence[WorkItem]) -> tuple[list[ItemOutput], float]:
        """Runs on the engine's thread, one step at a time in the order submitted. After a step fails,
        the step queued behind it is not run (its streams' caches may depend on the failed one)."""
        if self._broken is not None:
            raise _Skipped(self._broken)
        started = time.perf_counter()
        try:
            outputs = self.executor.execute(items)
        except BaseException as exc:
            self._broken = exc
            raise
        return outputs, time.perf_counter() - started

    def _submit(self, plan: StepPlan) -> asyncio.Future[tuple[list[ItemOutput], float]]:
        items = plan.items
        if self._depth > 1:
            # The next step is scheduled while this one runs: it must read the page tables as they are
            # now, not as the scheduler rewrites them for the next (copy-on-write, growth).
            items = [replace(item, kv=item.kv.snapshot()) for item in items]
        fut = asyncio.get_running_loop().run_in_executor(self._thread, self._execute, items)
        fut.add_done_callback(lambda _: self._kick())
        return fut

    def _land(self, plan: StepPlan, fut: asyncio.Future[tuple[list[ItemOutput], float]]) -> None:
        """A step is over: its outputs to the scheduler, its verdicts to the waiting feeds."""
        try:
            outputs, seconds = fut.result()
        except _Skipped as skipped:  # queued behind a step that failed: its streams go with it
            done = self.scheduler.fail(plan, skipped.cause)
            seconds = 0.0
        except WorkerDied as exc:  # every stream's cache died with the process
            log.error("%s: failing every live guard stream; the next step starts a new one", exc)
            done = self.scheduler.fail(plan, exc) + self.scheduler.fail_all(exc)
            self.scheduler.clear_cache()
            seconds = 0.0
        except Exception as exc:  # the engine survives a failed step; its streams do not
            log.error("guard step failed (%d streams, %d tokens)", len(plan.items), plan.tokens, exc_info=exc)
            done = self.scheduler.fail(plan, exc)
            seconds = 0.0
        else:
            done = self.scheduler.complete(plan, outputs)
            self._last_step = (plan.tokens, seconds)
            if self._on_step is not None:
                self._on_step(plan.tokens, len(plan.items), seconds)
            if self._on_batch is not None:
                self._on_batch([item.sid for item in plan.items])
        self._resolve(done)
        self._admit_waiters()

    async def _run(self) -> None:
        """Schedule a step, run it on the engine's thread, land it. With overlap (``_depth`` 2) the next
        step is scheduled and queued while one runs, so the device never waits for the bookkeeping."""
        assert self._wake is not None
        running: deque[tuple[StepPlan, asyncio.Future[tuple[list[ItemOutput], float]]]] = deque()
        while True:
            try:
                if running and running[0][1].done():
                    self._land(*running.popleft())
                    if not running:
                        self._broken = None  # nothing is queued behind a failure any more
                    continue
                now = time.monotonic()
                expired = self.scheduler.expire(now)
                if expired:  # streams that waited too long for memory: theirs is free for the others
                    self._resolve(expired)
                    self._admit_waiters()
                if len(running) < self._depth and self._broken is None:
                    plan = self.scheduler.schedule(now)
                    if plan is not None:
                        try:
                            running.append((plan, self._submit(plan)))
                        except BaseException as exc:
                            self._resolve(self.scheduler.fail(plan, exc))
                            raise
                        continue
                # Nothing to start: wait for new work, a step's end (both kick) or a memory deadline.
                self._wake.clear()
                if running and running[0][1].done():
                    continue
                deadline = self.scheduler.next_expiry()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            except Exception as exc:
                # A bug in the bookkeeping must not leave every caller waiting forever: fail what is
                # live (the steps in flight are forgotten), keep serving new streams; wait for new
                # work rather than spin on the same error.
                log.exception("guard engine loop error; failing live streams")
                self._resolve(self.scheduler.fail_all(exc))
                running.clear()
                self._admit_waiters()
                self._wake.clear()
                await self._wake.wait()
