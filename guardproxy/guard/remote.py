"""The worker's side of the shared guard engine: ``RemoteEngine`` and ``RemoteStream`` speak the
``Engine`` and ``Stream`` protocols over the link to the engine process (``link.py``). No torch here.

A stream behaves as ``GuardStream`` does, with one difference made invisible: a retraction reaches the
engine a little later than it is made, so verdicts of retracted tokens may already be on their way. The
worker mirrors the engine's bookkeeping (a feed's verdicts shrink from the newest feed back) and keeps
only the verdicts of tokens still fed, which is what the local engine hands over.

When the engine process goes away, every live stream fails (its cache died with the process; the
exchange applies the policy's ``on_guard_error``), opening a stream raises ``EngineUnavailable`` (503
with Retry-After) and the link reconnects, with backoff, to the engine the supervisor starts again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from guardproxy.aio import cancel_and_wait
from guardproxy.guard.api import EngineStats
from guardproxy.guard.errors import EngineError, EngineUnavailable, StreamClosed
from guardproxy.guard.link import Link, Message, decode_error
from guardproxy.guard.verdict import GuardLabels, Verdict

log = logging.getLogger(__name__)

IDLE_STATS = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0)


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class RemoteStream:
    def __init__(self, engine: RemoteEngine, wsid: int, link: Link, prompt: bool) -> None:
        self._engine = engine
        self._link = link
        self.sid = wsid
        self.closed = False
        self._failed: EngineError | None = None
        loop = asyncio.get_running_loop()
        self._prompt: asyncio.Future[Verdict] | None = loop.create_future() if prompt else None
        if self._prompt is not None:
            self._prompt.add_done_callback(_quiet)
        self._feeds: dict[int, tuple[asyncio.Future[list[Verdict]], int]] = {}  # fid -> (future, wanted)
        self._fids = itertools.count()

    async def prompt_verdict(self) -> Verdict:
        if self._prompt is None:
            raise EngineError("this stream was opened without a prompt verdict position")
        return await asyncio.shield(self._prompt)

    def feed(self, ids: Sequence[int]) -> asyncio.Future[list[Verdict]]:
        out: asyncio.Future[list[Verdict]] = asyncio.get_running_loop().create_future()
        out.add_done_callback(_quiet)
        if self.closed:
            out.set_exception(StreamClosed(f"guard stream {self.sid} is closed"))
        elif self._failed is not None:
            out.set_exception(self._failed)
        elif not ids:
            out.set_result([])
        else:
            fid = next(self._fids)
            self._feeds[fid] = (out, len(ids))
            self._link.send(("feed", self.sid, fid, list(ids), True))
        return out

    async def judge(self, ids: Sequence[int]) -> list[Verdict]:
        return await self.feed(ids)

    def feed_context(self, ids: Sequence[int]) -> None:
        if ids and not self.closed and self._failed is None:
            self._link.send(("feed", self.sid, None, list(ids), False))

    def retract(self, n: int) -> None:
        if self.closed or self._failed is not None or n <= 0:
            return
        self._link.send(("retract", self.sid, n))
        # As the scheduler does: the newest feeds lose their last tokens first; one left wanting
        # nothing is done now (the engine's answer for it, in flight or to come, is dropped).
        for fid in reversed(list(self._feeds)):
            fut, wanted = self._feeds[fid]
            take = min(n, wanted)
            n -= take
            if take == wanted:
                del self._feeds[fid]
                fut.set_result([])
            else:
                self._feeds[fid] = (fut, wanted - take)
            if not n:
                break

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fail(StreamClosed(f"guard stream {self.sid} was closed"))
        self._engine._forget(self)

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- answers from the engine ---------------------------------------------------------------------

    def _prompt_done(self, raw: Any, error: EngineError | None) -> None:
        if self._prompt is None or self._prompt.done():
            return
        if error is not None:
            self._prompt.set_exception(error)
        else:
            self._prompt.set_result(Verdict(raw[0], raw[1], self._engine.labels.query))

    def _verdicts(self, fid: int, raws: list[Any]) -> None:
        entry = self._feeds.pop(fid, None)
        if entry is None:  # retracted to nothing, or the stream failed or closed meanwhile
            return
        fut, wanted = entry
        labels = self._engine.labels.response
        fut.set_result([Verdict(r[0], r[1], labels) for r in raws[:wanted]])

    def _feed_failed(self, fid: int, error: EngineError) -> None:
        entry = self._feeds.pop(fid, None)
        if entry is not None:
            entry[0].set_exception(error)

    def _fail(self, error: EngineError) -> None:
        """Every pending answer fails with ``error``; later feeds fail at once."""
        if self._failed is None:
            self._failed = error
        self._prompt_done(None, error)
        feeds, self._feeds = self._feeds, {}
        for fut, _ in feeds.values():
            fut.set_exception(error)


class RemoteEngine:
    """A client of the engine process at ``path``. ``start`` returns at once; ``ready`` tells whether
    the engine is connected (``/readyz``)."""

    def __init__(self, path: str, *, max_prompt_tokens: int, wait_s: float = 30.0) -> None:
        """``wait_s``: how long an opener waits for an engine that is not connected (starting, or
        restarting after a crash) before ``EngineUnavailable``; the engine's own queue timeout."""
        self.path = path
        self.wait_s = wait_s
        self._max_prompt_tokens = max_prompt_tokens
        self._labels: GuardLabels | None = None
        self._link: Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._streams: dict[int, RemoteStream] = {}
        self._opening: dict[int, asyncio.Future[None]] = {}
        self._wsids = itertools.count()
        self._stats = IDLE_STATS
        self._connected = asyncio.Event()
        # What another worker shared, by topic (a live-view record, a Responses API turn).
        self.on_share: dict[str, Callable[[Any], None]] = {}
        self.engine_pid: int | None = None

    # -- the Engine protocol ---------------------------------------------------------------------------

    @property
    def labels(self) -> GuardLabels:
        if self._labels is None:
            raise EngineUnavailable("the guard engine has not connected yet")
        return self._labels

    @property
    def max_prompt_tokens(self) -> int:
        return self._max_prompt_tokens

    @property
    def ready(self) -> bool:
        return self._link is not None

    def stats(self) -> EngineStats:
        return self._stats

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="guard-engine-link")

    async def connected(self) -> None:
        """Until the engine is connected (wrap in ``asyncio.timeout``)."""
        await self._connected.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def open(
        self, prompt_ids: Sequence[int], verdict_index: int | None, anchor_start: int = 0
    ) -> RemoteStream:
        if self._link is None:
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._connected.wait()
            except TimeoutError:
                raise EngineUnavailable(
                    f"the guard engine is not connected (starting or restarting; waited {self.wait_s:g}s)"
                ) from None
        link = self._link
        if link is None:  # connected, and lost again before this opener ran
            raise EngineUnavailable("the guard engine went away")
        wsid = next(self._wsids)
        stream = RemoteStream(self, wsid, link, prompt=verdict_index is not None)
        self._streams[wsid] = stream  # before the answer: the prompt verdict may come in the same frame
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        opened.add_done_callback(_quiet)
        self._opening[wsid] = opened
        link.send(("open", wsid, list(prompt_ids), verdict_index, anchor_start))
        try:
            await opened
        except BaseException:
            stream.close()  # refused, or the opener went away while it waited: nothing is left behind
            raise
        finally:
            self._opening.pop(wsid, None)
        return stream

    def share(self, topic: str, payload: Any) -> None:
        """Hand ``payload`` to every other worker's ``on_share[topic]`` (lost while unconnected)."""
        if self._link is not None:
            self._link.send(("share", topic, payload))

    def _forget(self, stream: RemoteStream) -> None:
        if self._streams.pop(stream.sid, None) is not None and stream._link is self._link:
            stream._link.send(("close", stream.sid))

    # -- the connection --------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                # Not there yet (the engine is loading its model) or being restarted.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            link = Link(reader, writer)
            try:
                hello, *rest = await link.recv()  # what else came in the first frame follows it
                _, self._labels, self._max_prompt_tokens, self.engine_pid, self._stats = hello
                self._link = link
                self._connected.set()
                delay = 0.05
                log.info("connected to the guard engine (pid %s)", self.engine_pid)
                messages = rest
                while True:
                    for message in messages:
                        self._dispatch(message)
                    messages = await link.recv()
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                if self._link is link:
                    log.error("the guard engine went away: failing this worker's live guard streams")
            except Exception:  # a bug on this side: start over on a new connection rather than stop
                log.exception("guard engine link failed: failing this worker's live guard streams")
            finally:
                self._lost(link)

    def _lost(self, link: Link) -> None:
        link.close()
        if self._link is not link:
            return
        self._link = None
        self._connected.clear()
        self._stats = IDLE_STATS
        error = EngineUnavailable("the guard engine process went away")
        for fut in self._opening.values():
            if not fut.done():
                fut.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(EngineError("the guard engine process went away; its guard state is lost"))

    def _dispatch(self, m: Message) -> None:
        kind = m[0]
        if kind == "verdicts":
            if (s := self._streams.get(m[1])) is not None:
                s._verdicts(m[2], m[3])
        elif kind == "stats":
            self._stats = m[1]
        elif kind == "prompt":
            if (s := self._streams.get(m[1])) is not None:
                s._prompt_done(m[2], None)
        elif kind == "opened":
            if (fut := self._opening.get(m[1])) is not None and not fut.done():
                fut.set_result(None)
        elif kind == "open_failed":
            if (fut := self._opening.get(m[1])) is not None and not fut.done():
                fut.set_exception(decode_error(m[2]))
        elif kind == "prompt_failed":
            if (s := self._streams.get(m[1])) is not None:
                s._prompt_done(None, decode_error(m[2]))
        elif kind == "feed_failed":
            if (s := self._streams.get(m[1])) is not None:
                s._feed_failed(m[2], decode_error(m[3]))
        elif kind == "stream_failed":
            if (s := self._streams.get(m[1])) is not None:
                s._fail(decode_error(m[2]))
        elif kind == "share":
            if (receive := self.on_share.get(m[1])) is not None:
                receive(m[2])
        else:
            log.warning("unknown message from the guard engine: %r", kind)
