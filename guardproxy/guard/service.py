"""The engine process of several proxy workers (``server.workers`` > 1): one ``GuardEngine`` (one
model, one KV pool, one scheduler) serving the streams of every worker over the link (``link.py``), so
a step batches the streams of all workers together.

Each connection is one worker. Its streams are known by the worker's own numbers; when the connection
ends (the worker exited or was killed) every stream it had is closed, so its memory returns to the
others. Engine statistics go to every worker four times a second, for their ``/metrics`` and
``/readyz``; what one worker shares (a decision for the ``/ui`` live view, a Responses API turn for
``previous_response_id``) is handed to all the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardproxy.guard.engine import GuardEngine, GuardStream
from guardproxy.guard.errors import EngineError, StreamClosed
from guardproxy.guard.link import Link, Message, encode_error
from guardproxy.guard.verdict import Verdict
from guardproxy.observe.metrics import Metrics

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


@dataclass
class _Worker:
    """One connected proxy worker: its streams by its own numbers."""

    id: int
    link: Link
    streams: dict[int, GuardStream] = field(default_factory=dict)
    opening: set[int] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)  # closed by the worker while still opening


def _raw(v: Verdict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return v.risk_probs, v.category_probs


class EngineService:
    def __init__(
        self,
        engine: GuardEngine,
        path: str,
        metrics: Metrics | None = None,
        replay: Mapping[str, int] | None = None,
    ) -> None:
        """``replay``: per shared topic, how many of the latest messages a worker gets when it connects
        (one that starts late or restarts learns what the others shared before it was there: the live
        view's records, the Responses API's turns)."""
        self.engine = engine
        self.path = path
        self.metrics = metrics
        self.workers: dict[int, _Worker] = {}
        self._owner: dict[int, int] = {}  # engine stream id -> worker id
        self._ids = itertools.count()
        self._replay = {topic: deque[Message](maxlen=n) for topic, n in (replay or {}).items() if n > 0}
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by an engine that died
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)
        self._ticker = asyncio.create_task(self._tick(), name="guard-engine-stats")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for w in list(self.workers.values()):
            w.link.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def on_batch(self, sids: Sequence[int]) -> None:
        """After each step: how many workers' streams it held (``guardproxy_engine_batch_workers``)."""
        if self.metrics is not None:
            self.metrics.batch_workers.observe(len({self._owner.get(sid) for sid in sids}))

    # -- one worker ----------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and _peer_uid(sock) != os.getuid():  # the directory keeps others out already
            writer.close()
            return
        w = _Worker(next(self._ids), Link(reader, writer))
        self.workers[w.id] = w
        e = self.engine
        w.link.send(("hello", e.labels, e.max_prompt_tokens, os.getpid(), e.stats()))
        for kept in self._replay.values():
            for message in kept:
                w.link.send(message)
        log.info("proxy worker connected (%d connected)", len(self.workers))
        try:
            while True:
                for message in await w.link.recv():
                    self._handle(w, message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            # The worker is gone: whatever it had open is freed for the others.
            del self.workers[w.id]
            w.link.close()
            w.cancelled |= w.opening
            for stream in w.streams.values():
                self._owner.pop(stream.sid, None)
                stream.close()
            log.info("proxy worker disconnected: %d guard streams freed", len(w.streams))
            w.streams.clear()

    def _handle(self, w: _Worker, m: Message) -> None:
        kind = m[0]
        if kind == "feed":
            _, wsid, fid, ids, judge = m
            stream = w.streams.get(wsid)
            if stream is None:
                if judge:
                    error = StreamClosed(f"guard stream {wsid} is not open")
                    w.link.send(("feed_failed", wsid, fid, encode_error(error)))
                return
            if judge:
                stream.feed(ids).add_done_callback(lambda f: self._fed(w, wsid, fid, f))
            else:
                stream.feed_context(ids)
        elif kind == "retract":
            _, wsid, n = m
            if (stream := w.streams.get(wsid)) is not None:
                try:
                    stream.retract(n)
                except EngineError as exc:  # the stream lost track: it is failed, as locally
                    w.link.send(("stream_failed", wsid, encode_error(exc)))
                    self._close(w, wsid)
        elif kind == "open":
            _, wsid, prompt_ids, verdict_index, anchor_start = m
            w.opening.add(wsid)
            self._spawn(self._open(w, wsid, prompt_ids, verdict_index, anchor_start))
        elif kind == "close":
            if m[1] in w.opening:
                w.cancelled.add(m[1])
            self._close(w, m[1])
        elif kind == "share":
            if (kept := self._replay.get(m[1])) is not None:
                kept.append(m)
            for other in self.workers.values():
                if other is not w:
                    other.link.send(m)
        else:
            log.warning("unknown message from a proxy worker: %r", kind)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(
        self, w: _Worker, wsid: int, prompt_ids: list[int], verdict_index: int | None, anchor_start: int
    ) -> None:
        try:
            stream = await self.engine.open(prompt_ids, verdict_index, anchor_start)
        except Exception as exc:  # the engine's refusal, or a bug: the opener must hear either way
            if not isinstance(exc, EngineError):
                log.exception("opening a guard stream failed")
            w.cancelled.discard(wsid)
            w.link.send(("open_failed", wsid, encode_error(exc)))
            return
        finally:
            w.opening.discard(wsid)
        if wsid in w.cancelled or w.link.closed:  # the opener went away while it waited
            w.cancelled.discard(wsid)
            stream.close()
            return
        w.streams[wsid] = stream
        self._owner[stream.sid] = w.id
        w.link.send(("opened", wsid))
        if verdict_index is not None:
            try:
                verdict = await stream.prompt_verdict()
            except EngineError as exc:
                w.link.send(("prompt_failed", wsid, encode_error(exc)))
            else:
                w.link.send(("prompt", wsid, _raw(verdict)))

    def _fed(self, w: _Worker, wsid: int, fid: int, fut: asyncio.Future[list[Verdict]]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            w.link.send(("feed_failed", wsid, fid, encode_error(exc)))
        else:
            w.link.send(("verdicts", wsid, fid, [_raw(v) for v in fut.result()]))

    def _close(self, w: _Worker, wsid: int) -> None:
        stream = w.streams.pop(wsid, None)
        if stream is not None:
            self._owner.pop(stream.sid, None)
            stream.close()

    async def _tick(self) -> None:
        last = None
        while True:
            stats = self.engine.stats()
            if stats != last:
                for w in self.workers.values():
                    w.link.send(("stats", stats))
                last = stats
            await asyncio.sleep(STATS_INTERVAL_S)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)
