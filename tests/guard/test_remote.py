"""The shared engine over its link: ``RemoteEngine`` (a proxy worker's side) talking to
``EngineService`` (the engine process's side) over a real Unix socket, here in one process and one
event loop, with a tiny checkpoint loaded through the production path.

Parity: through the link, with retractions made before or after verdicts come back, every verdict a
stream hands out equals a full forward over the ids that stay (float64, 1e-9), as the local engine's
do. Then the link's own behaviour: one frame per loop iteration, a worker that goes away frees its
streams, an engine that goes away fails them and a new one is reconnected to, errors keep their kind.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from guardproxy.guard.engine import GuardEngine
from guardproxy.guard.errors import EngineError, EngineOverloaded, EngineUnavailable
from guardproxy.guard.limits import EngineLimits
from guardproxy.guard.model import Qwen3GuardStream, load_guard_model
from guardproxy.guard.remote import RemoteEngine
from guardproxy.guard.service import EngineService
from guardproxy.guard.template import ChatTemplate

from ..conftest import scaffold
from .test_engine import WORDS, reference

LIMITS = EngineLimits(max_cached_tokens=16 * 1024, prefill_chunk=48, max_batch_tokens=96)


@pytest.fixture(scope="module")
def model64(random_checkpoint: Path) -> Qwen3GuardStream:
    return load_guard_model(random_checkpoint, device="cpu", dtype=torch.float64)


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``check`` (engine state the test cannot wait on) until it holds, with a deadline."""
    async with asyncio.timeout(seconds):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


class Shared:
    """An engine service on a socket in ``tmp``, and a worker's client of it."""

    def __init__(self, model: Qwen3GuardStream, tmp: Path, limits: EngineLimits = LIMITS) -> None:
        self.model, self.limits = model, limits
        self.path = str(tmp / "engine.sock")

    async def start_engine(self) -> None:
        self.engine = GuardEngine(self.model, self.limits)
        await self.engine.start()
        self.service = EngineService(self.engine, self.path)
        await self.service.start()

    async def stop_engine(self) -> None:
        await self.service.stop()
        await self.engine.stop()

    async def client(self) -> RemoteEngine:
        remote = RemoteEngine(self.path, max_prompt_tokens=self.limits.max_prompt_tokens)
        await remote.start()
        async with asyncio.timeout(10):
            await remote.connected()
        return remote


@pytest.fixture
async def shared(model64: Qwen3GuardStream, tmp_path: Path) -> AsyncIterator[Shared]:
    s = Shared(model64, tmp_path)
    await s.start_engine()
    yield s
    await s.stop_engine()


@pytest.mark.parametrize("seed", range(6))
async def test_verdicts_through_the_link_match_a_full_forward(
    shared: Shared, template: ChatTemplate, seed: int
) -> None:
    rng = random.Random(seed)
    remote = await shared.client()
    context = scaffold(template)

    async def one_stream() -> None:
        prompt = template.render_prompt([{"role": "user", "content": " ".join(rng.choices(WORDS, k=8))}])
        stream = await remote.open(prompt.ids, prompt.verdict_index, prompt.anchor_start)
        pv = await stream.prompt_verdict()
        stream.feed_context(context)
        kept_ids: list[int] = []
        # (future, how many of its verdicts count, whether it must hand out exactly those)
        feeds: list[tuple[asyncio.Future[Any], int, bool]] = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.5:  # a tentative guess, partly or wholly taken back
                guess = [rng.randrange(151643) for _ in range(rng.randint(1, 4))]
                fut = stream.feed(guess)
                back = rng.randint(0, len(guess))
                if rng.random() < 0.5:
                    await asyncio.sleep(0)  # let the feed leave, sometimes let a step judge it
                    if rng.random() < 0.5:
                        await asyncio.wait([fut], timeout=0.05)
                # Verdicts already handed out: the caller drops the taken-back ones itself (as the
                # exchange does); otherwise the feed hands out only those of the tokens that stay.
                handed_out = fut.done()
                seen[handed_out] += 1
                stream.retract(back)
                kept = len(guess) - back
                feeds.append((fut, kept, not handed_out))
                kept_ids += guess[:kept]
            chunk = [rng.randrange(151643) for _ in range(rng.randint(1, 12))]
            feeds.append((stream.feed(chunk), len(chunk), True))
            kept_ids += chunk
        got = []
        for fut, kept, exact in feeds:
            verdicts = await fut
            assert len(verdicts) == kept if exact else len(verdicts) >= kept
            got += verdicts[:kept]
        stream.close()
        ref_q, ref_r = reference(shared.model, prompt, context, kept_ids)
        torch.testing.assert_close(torch.tensor(pv.risk_probs, dtype=torch.float64), ref_q, atol=1e-9, rtol=0)
        assert len(got) == len(kept_ids)
        got_r = torch.tensor([v.risk_probs for v in got], dtype=torch.float64)
        torch.testing.assert_close(got_r, ref_r, atol=1e-9, rtol=0)

    seen = {True: 0, False: 0}
    await asyncio.gather(*(one_stream() for _ in range(4)))
    await until(lambda: shared.engine.stats().active_streams == 0)
    await remote.stop()


async def test_a_retraction_not_yet_answered_keeps_only_the_verdicts_that_stay(
    shared: Shared, template: ChatTemplate
) -> None:
    """The engine may already have judged (and sent) tokens the worker takes back: what the feed hands
    out is what the local engine would, the verdicts of the tokens that stay."""
    remote = await shared.client()
    prompt = template.render_prompt([{"role": "user", "content": "hi"}])
    stream = await remote.open(prompt.ids, None)
    stream.feed_context(scaffold(template))
    fut = stream.feed([11, 12, 13])
    await until(lambda: shared.engine.stats().steps > 0 and shared.engine.stats().active_streams == 1)
    # Let the engine judge all three before the worker's retraction reaches it.
    await until(lambda: all(not s.pend_ids for s in shared.engine.scheduler.streams.values()))
    stream.retract(2)
    assert [len(await fut)] == [1]
    gone = stream.feed([14, 15])  # wholly taken back at once: done now, no verdict
    stream.retract(2)
    assert gone.done() and gone.result() == []
    stream.close()
    await remote.stop()


async def test_one_frame_per_loop_iteration(shared: Shared, template: ChatTemplate) -> None:
    remote = await shared.client()
    prompt = template.render_prompt([{"role": "user", "content": "hi"}])
    streams = [await remote.open(prompt.ids, None) for _ in range(8)]
    link = remote._link
    assert link is not None
    before = (link.frames_sent, link.messages_sent)
    futs = [s.feed([1, 2, 3]) for s in streams]  # eight feeds in one iteration
    await asyncio.gather(*futs)
    assert (link.frames_sent - before[0], link.messages_sent - before[1]) == (1, 8)
    # The verdicts came back in as few frames as the engine took steps (usually one).
    for s in streams:
        s.close()
    await remote.stop()


async def test_a_worker_that_goes_away_frees_its_streams(shared: Shared, template: ChatTemplate) -> None:
    remote = await shared.client()
    prompt = template.render_prompt([{"role": "user", "content": "hi"}])
    for _ in range(3):
        s = await remote.open(prompt.ids, prompt.verdict_index)
        s.feed([5, 6, 7])
    await until(lambda: shared.engine.stats().active_streams == 3)
    await remote.stop()  # the connection ends without a single close
    await until(lambda: shared.engine.stats().active_streams == 0 and not shared.service.workers)


async def test_an_engine_that_goes_away_fails_streams_and_a_new_one_is_reconnected(
    shared: Shared, template: ChatTemplate
) -> None:
    remote = await shared.client()
    prompt = template.render_prompt([{"role": "user", "content": "hi"}])
    stream = await remote.open(prompt.ids, prompt.verdict_index)
    await stream.prompt_verdict()
    await shared.stop_engine()
    pending = stream.feed([1, 2, 3])  # sent into a dying link, or failed at once
    with pytest.raises(EngineError, match="went away"):
        await asyncio.wait_for(pending, 10)
    await until(lambda: not remote.ready)
    remote.wait_s = 0.05
    with pytest.raises(EngineUnavailable):  # no engine within the wait
        await remote.open(prompt.ids, None)
    remote.wait_s = 30
    waiting = asyncio.ensure_future(remote.open(prompt.ids, prompt.verdict_index))
    await asyncio.sleep(0)
    assert not waiting.done()
    await shared.start_engine()  # the supervisor's new engine, on the same path: the opener goes on
    fresh = await asyncio.wait_for(waiting, 10)
    assert (await fresh.prompt_verdict()).risk_probs
    assert len(await fresh.judge([1, 2])) == 2
    fresh.close()
    await remote.stop()


async def test_errors_keep_their_kind_across_the_link(
    model64: Qwen3GuardStream, template: ChatTemplate, tmp_path: Path
) -> None:
    s = Shared(model64, tmp_path, EngineLimits(max_cached_tokens=4096, max_streams=1, max_queue=0))
    await s.start_engine()
    try:
        remote = await s.client()
        prompt = template.render_prompt([{"role": "user", "content": "hi"}])
        first = await remote.open(prompt.ids, None)
        with pytest.raises(EngineOverloaded) as err:
            await remote.open(prompt.ids, None)
        assert not isinstance(err.value, EngineUnavailable) and err.value.retry_after >= 1.0
        first.close()
        await until(lambda: s.engine.stats().active_streams == 0)
        (await remote.open(prompt.ids, None)).close()  # room again once the first is closed
        await remote.stop()
    finally:
        await s.stop_engine()


async def test_a_worker_that_connects_later_gets_the_latest_shared_messages(shared: Shared) -> None:
    """What workers shared before another connected (it started late, or restarted) reaches it on
    connecting: the newest ``replay`` messages of each topic, in order; topics not kept are not."""
    await shared.service.stop()
    shared.service = EngineService(shared.engine, shared.path, replay={"live": 3})
    await shared.service.start()
    first = await shared.client()
    for k in range(5):
        first.share("live", {"record": k})
        first.share("other", k)
    await until(lambda: len(shared.service._replay["live"]) == 5 - 2)  # the newest 3 kept
    got: list[tuple[str, object]] = []
    late = RemoteEngine(shared.path, max_prompt_tokens=shared.limits.max_prompt_tokens)
    late.on_share["live"] = lambda payload: got.append(("live", payload))
    late.on_share["other"] = lambda payload: got.append(("other", payload))
    await late.start()
    async with asyncio.timeout(10):
        await late.connected()
    first.share("live", {"record": 5})  # and what is shared from now on, after them
    await until(lambda: len(got) == 4)
    assert got == [("live", {"record": k}) for k in (2, 3, 4, 5)]
    await late.stop()
    await first.stop()
