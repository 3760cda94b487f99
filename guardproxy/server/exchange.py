"""One moderated exchange with the upstream, for any API: the I/O and nothing else.

Flow: open a guard stream on the rendered prompt and judge it; the request's ``Session`` (sans-IO)
decides when the upstream is asked, whether the prompt is blocked and how, and what the request
tells (details, headers, outcome, audit record). The upstream's events go through the request's
``Wire`` (what each API's events mean) into the sans-IO core (``Outputs``: what is fed, judged,
released, cut). This module carries out the commands of both: the upstream request, guard streams,
verdict futures, writes, metrics, closing the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from guardproxy.apis.errors import (
    ProxyError,
    bad_upstream,
    engine_error,
    guard_failed,
    prompt_blocked,
    upstream_error,
)
from guardproxy.apis.responses_store import ResponseStore
from guardproxy.apis.wire import Wire
from guardproxy.guard.api import Engine, Stream
from guardproxy.guard.errors import EngineError
from guardproxy.guard.template import ChatTemplate, GuardPrompt
from guardproxy.guard.verdict import Verdict
from guardproxy.observe.audit import AuditLog
from guardproxy.observe.live import LiveFeed
from guardproxy.observe.logs import request_id
from guardproxy.observe.metrics import Metrics
from guardproxy.policy import Policy
from guardproxy.server.prompts import judge_prompt
from guardproxy.server.upstream import Upstream, returned_headers
from guardproxy.stream.outputs import (
    Abort,
    CloseUpstream,
    Command,
    CountFailure,
    Emit,
    Event,
    Feed,
    Open,
    Outputs,
    Retract,
    Text,
    ToolArgs,
)
from guardproxy.stream.session import (
    BlockPrompt,
    CountPrompt,
    Request,
    Session,
    SessionCommand,
    StartUpstream,
)
from guardproxy.stream.sse import SSEDecoder, SSEError

log = logging.getLogger(__name__)


@dataclass
class GuardServices:
    engine: Engine
    template: ChatTemplate
    upstream: Upstream
    max_choices: int
    metrics: Metrics
    audit: AuditLog | None = None
    audit_text_chars: int = 4000
    responses: ResponseStore | None = None  # turns of Responses API answers, for previous_response_id
    live: LiveFeed | None = None  # the live view's recent decisions
    # Done a little before the shutdown grace period ends: streams still running end themselves cleanly
    # (an error event, a complete body) instead of being cut by the server's forced close.
    stopping: asyncio.Future[None] | None = None


class EventSink(Protocol):
    """Where a streamed answer's events go: the SSE response (the default), or a WebSocket's frames."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...


class _Stream:
    """One output's guard stream and the verdicts it waits for, in feed order."""

    def __init__(self, stream: Stream, owned: bool) -> None:
        self.stream = stream
        self.owned = owned  # closed with the exchange (output 0 shares the prompt's stream)
        self.pending: deque[asyncio.Future[list[Verdict]]] = deque()
        self.fed_at: deque[float] = deque()


class Exchange:
    def __init__(
        self,
        services: GuardServices,
        request: web.Request,
        wire: Wire,
        policy: Policy,
        prompt: GuardPrompt,
        forward_key: bool = True,
        sink: EventSink | None = None,
    ) -> None:
        self.s = services
        self.sink = sink  # events go here instead of an SSE response (the WebSocket mode)
        self.forward_key = forward_key  # the client's key goes upstream (no keys of our own)
        self.request = request
        self.wire = wire
        self.policy = policy
        self.prompt = prompt
        self.outputs = Outputs(
            services.template,
            policy,
            speculate=wire.streaming,
            max_outputs=wire.max_outputs,
            record=policy.audit_text and services.live is not None,
        )
        self.session = Session(policy, self.outputs, Request(wire.route, wire.model, wire.streaming))
        self.streams: dict[int, _Stream] = {}
        self._guard: Stream | None = None
        self._upstream: asyncio.Task[aiohttp.ClientResponse] | None = None
        self._resp: aiohttp.ClientResponse | None = None
        self.started = time.perf_counter()
        self._upstream_started = 0.0
        self._first_upstream_text: float | None = None
        self._first_release: float | None = None

    # -- the whole exchange ----------------------------------------------------------------------------

    async def run(self) -> web.StreamResponse | EventSink:
        try:
            self._guard = await self.s.engine.open(
                self.prompt.ids, self.prompt.verdict_index, self.prompt.anchor_start
            )
        except EngineError as exc:
            self.session.status = engine_error(exc).status
            raise engine_error(exc) from None
        try:
            await self._execute(self.session.start())
            try:
                verdict, windows = await judge_prompt(
                    self.s.engine, self._guard, self.prompt, self.policy, self.s.metrics
                )
            except EngineError as exc:
                commands = self.session.prompt_failed(str(exc))
            else:
                commands = self.session.prompt_judged(verdict, windows)
            await self._execute(commands)
            for c in commands:
                if isinstance(c, BlockPrompt):
                    await self._cancel_upstream(abort=True)
                    return await self._blocked(c)
            assert self._upstream is not None
            self._resp = await self._upstream
            if self._resp.status != 200:
                err = upstream_error(self._resp.status, await self._resp.read())
                err.headers = {**returned_headers(self._resp.headers), **(err.headers or {})}
                raise err
            if self.wire.streaming:
                return await self._stream()
            return await self._whole()
        except ProxyError as exc:
            self.session.status = exc.status
            raise
        except asyncio.CancelledError:
            self.session.status = 499
            raise
        finally:
            self._record_outcome()
            await self._cancel_upstream()
            for s in self.streams.values():
                if s.owned:
                    s.stream.close()
            self._guard.close()

    # -- commands --------------------------------------------------------------------------------------

    async def _execute(
        self, commands: list[Command] | list[SessionCommand], write: list[bytes] | None = None
    ) -> None:
        """Carry out the commands of the core and of the session; released items are rendered into
        ``write`` (when given). A blocked prompt (``BlockPrompt``) is ``run``'s to answer."""
        for c in commands:
            if isinstance(c, StartUpstream):
                self._start_upstream()
            elif isinstance(c, CountPrompt):
                self.s.metrics.prompt_verdicts.labels(c.risk, c.category, str(c.action)).inc()
            elif isinstance(c, Feed):
                s = self.streams[c.output]
                if c.judged:
                    s.pending.append(s.stream.feed(c.ids))
                    s.fed_at.append(time.perf_counter())
                else:
                    s.stream.feed_context(c.ids)
            elif isinstance(c, Emit):
                if write is not None:
                    write.append(self.wire.render(c.output, c.out, self.session.details))
                if c.out.kind == "text" and c.out.arrived is not None:
                    now = time.perf_counter()
                    self.s.metrics.chunk_added_latency.observe(now - c.out.arrived)
                    if self._first_release is None:
                        self._first_release = now
            elif isinstance(c, Retract):
                s = self.streams[c.output]
                try:
                    s.stream.retract(c.n)
                except EngineError as exc:  # the guard lost track of this stream: a guard failure
                    await self._failed(c.output, exc)
            elif isinstance(c, Open):
                await self._open(c.output)
            elif isinstance(c, CloseUpstream):
                if self._resp is not None:
                    self._resp.close()
            elif isinstance(c, CountFailure):
                self.s.metrics.guard_failures.labels(c.mode).inc()
            elif isinstance(c, Abort):
                raise guard_failed(c.reason)

    async def _open(self, index: int) -> None:
        assert self._guard is not None
        if index == 0 or self.outputs.failure is not None:
            self.streams[index] = _Stream(self._guard, owned=False)
            return
        # Each further choice continues the same prompt in a stream of its own.
        try:
            stream = await self.s.engine.open(self.prompt.ids, None, self.prompt.anchor_start)
        except EngineError as exc:
            raise engine_error(exc) from None
        self.streams[index] = _Stream(stream, owned=True)

    async def _failed(self, index: int, exc: EngineError) -> None:
        s = self.streams[index]
        for fut in s.pending:
            fut.cancel()
        s.pending.clear()
        s.fed_at.clear()
        await self._execute(self.outputs.guard_failed(index, str(exc)))

    async def _settle(self, index: int | None = None) -> None:
        """Hand the verdicts that are back to the core, in each output's feed order."""
        for i, s in list(self.streams.items()):
            if index is not None and i != index:
                continue
            while s.pending and s.pending[0].done():
                fut = s.pending.popleft()
                self.s.metrics.observe_verdict_wait(time.perf_counter() - s.fed_at.popleft())
                try:
                    verdicts = fut.result()
                except EngineError as exc:
                    await self._failed(i, exc)
                    break
                self.outputs.judged(i, verdicts)

    async def _event(self, e: Event, now: float) -> None:
        # Verdicts already back go in first: the event may take tentative tokens back, and a verdict of
        # a token taken back must not still be on its way.
        await self._settle(e.output)
        if self._first_upstream_text is None and isinstance(e, Text | ToolArgs) and e.text:
            self._first_upstream_text = now
        await self._execute(self.outputs.event(e, now))

    # -- bookkeeping -----------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return self.session.headers(returned_headers(self._resp.headers) if self._resp is not None else {})

    def _record_outcome(self) -> None:
        m = self.s.metrics
        for mod in self.outputs.moderators.values():
            d = mod.decided
            if d is not None:
                m.response_actions.labels(str(d.action), d.tier, d.category or "").inc()
        if self._first_release is not None:
            m.ttft.labels("proxy").observe(self._first_release - self.started)
        if self._first_upstream_text is not None:
            m.ttft.labels("upstream").observe(self._first_upstream_text - self._upstream_started)
        if self.s.audit is None and self.s.live is None:
            return
        record = self.session.audit_record(
            request_id.get(),
            time.perf_counter() - self.started,
            self.wire.prompt_text,
            self.s.audit_text_chars,
        )
        if self.s.audit is not None:
            try:
                self.s.audit.write(record)
            except OSError:
                log.exception("could not write the audit record")
        if self.s.live is not None:
            if self.outputs.record:  # text was recorded: the answer as it was judged, token by token
                record = {**record, "tokens": self.outputs.tokens()}
            self.s.live.publish(record)

    # -- upstream --------------------------------------------------------------------------------------

    def _start_upstream(self) -> None:
        self._upstream_started = time.perf_counter()
        query = self.request.query_string  # e.g. Claude Code's ?beta=true: the upstream's to read
        request = self.s.upstream.request(
            "POST",
            self.wire.route + (f"?{query}" if query else ""),
            self.request.headers,
            self.wire.upstream_body(),
            forward_auth=self.forward_key,
        )
        self._upstream = asyncio.create_task(request, name="guardproxy-upstream")

    async def _cancel_upstream(self, *, abort: bool = False) -> None:
        """Stop waiting on the upstream. ``abort`` (a blocked prompt, a cut) closes the connection so
        the upstream stops generating at once; otherwise a fully read response goes back to the pool
        (and one not fully read, as when the client left, is closed by ``release``)."""
        task, self._upstream = self._upstream, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        elif task is not None and not task.cancelled() and task.exception() is None and self._resp is None:
            task.result().close()
        if self._resp is not None:
            if abort:
                self._resp.close()
            else:
                self._resp.release()

    # -- a blocked prompt ------------------------------------------------------------------------------

    async def _blocked(self, block: BlockPrompt) -> web.StreamResponse | EventSink:
        if block.as_error:
            raise prompt_blocked(block.message, self.wire.conversation_param, self._headers())
        v = self.session.prompt_verdict
        assert v is not None
        answer = self.wire.blocked(v, self.session.details)
        if isinstance(answer, dict):
            return web.json_response(answer, headers=self._headers())
        out = await self._prepare_sse()
        await out.write(b"".join(answer))
        return out

    # -- streaming -------------------------------------------------------------------------------------

    async def _prepare_sse(self) -> EventSink:
        if self.sink is not None:
            return self.sink
        out = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **self._headers(),
            },
        )
        await out.prepare(self.request)
        return out

    async def _stream(self) -> EventSink:
        assert self._resp is not None
        out = await self._prepare_sse()
        decoder = SSEDecoder()
        reader: AsyncIterator[bytes] = self._resp.content.iter_any().__aiter__()
        next_read: asyncio.Task[bytes] | None = asyncio.create_task(_read(reader), name="guardproxy-read")
        upstream_done = False
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {next_read} if next_read is not None else set()
                waits |= {s.pending[0] for s in self.streams.values() if s.pending}
                if not waits:
                    break
                if self.s.stopping is not None:
                    waits.add(self.s.stopping)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if self.s.stopping is not None and self.s.stopping.done():
                    raise ProxyError(
                        503,
                        "the stream was ended by guardproxy (shutting down)",
                        type="server_error",
                        code="shutdown",
                    )
                if next_read is not None and next_read.done():
                    task, next_read = next_read, None
                    try:
                        data = task.result()
                    except StopAsyncIteration:
                        upstream_done = True
                        events = decoder.flush()
                    else:
                        events = decoder.feed(data)
                        next_read = asyncio.create_task(_read(reader), name="guardproxy-read")
                    now = time.perf_counter()
                    for event in events:
                        for e in self.wire.read_event(event):
                            await self._event(e, now)
                    if self.wire.upstream_done:
                        upstream_done = True
                    if upstream_done:
                        if next_read is not None:
                            next_read.cancel()
                            next_read = None
                        await self._settle()
                        # No last event from the upstream (a clean close mid-stream): truncated.
                        await self._execute(self.outputs.end(truncated=not self.wire.upstream_done))
                await self._settle()
                parts: list[bytes] = []
                await self._execute(self.outputs.drain(), parts)
                if parts:  # everything released at once goes out in one write
                    await out.write(b"".join(parts))
                if self.outputs.cut or (upstream_done and self.outputs.done):
                    break
            await out.write(self.wire.tail())
        except ProxyError as exc:
            await out.write(self.wire.error_event(exc))
        except SSEError as exc:
            await out.write(self.wire.error_event(bad_upstream(str(exc))))
        except (aiohttp.ClientError, TimeoutError) as exc:
            msg = f"upstream stream failed: {type(exc).__name__}: {exc}"
            await out.write(self.wire.error_event(bad_upstream(msg)))
        except asyncio.CancelledError:
            # Shutdown past its grace period (or the client left): end the stream cleanly for a
            # client still there, then let the cancellation through.
            end = ProxyError(
                503,
                "the stream was ended by guardproxy (shutting down)",
                type="server_error",
                code="shutdown",
            )
            with contextlib.suppress(BaseException):
                await asyncio.shield(_end_stream(out, self.wire.error_event(end)))
            raise
        finally:
            if next_read is not None:
                next_read.cancel()
                with contextlib.suppress(BaseException):
                    await next_read
        self._remember()
        return out

    # -- non-streaming ---------------------------------------------------------------------------------

    async def _whole(self) -> web.StreamResponse:
        assert self._resp is not None
        raw = await self._resp.read()
        now = time.perf_counter()
        for e in self.wire.read_whole(raw):
            await self._event(e, now)
        await self._execute(self.outputs.end())
        for s in list(self.streams.values()):
            while s.pending:
                await asyncio.wait([s.pending[0]])
                await self._settle()
        await self._execute(self.outputs.drain())
        body = self.wire.whole(self.outputs, self.session.details)
        self._remember()
        return web.json_response(body, headers=self._headers())

    def _remember(self) -> None:
        """Keep this answer's turns for a later request that continues it (Responses API)."""
        if self.s.responses is not None:
            self.wire.remember(self.s.responses, self.outputs)


async def _read(reader: AsyncIterator[bytes]) -> bytes:
    return await anext(reader)


async def _end_stream(out: EventSink, last: bytes) -> None:
    """The last bytes and the end of the chunked body: a complete response, even when cancelled."""
    await out.write(last)
    await out.write_eof()
