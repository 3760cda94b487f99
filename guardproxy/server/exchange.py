"""One moderated request/response exchange with the upstream, for chat and legacy completions.

Flow: open a guard stream on the rendered prompt; start the upstream request at once (policy
``parallel``) or after the prompt verdict (``before``); on a blocked prompt cancel the upstream and
answer by policy. Otherwise every choice's text goes through its ``ChoiceModerator`` and guard stream;
the client gets only what the moderator releases, in chunks rebuilt on the upstream's envelope.
All per-choice state lives in ``_Choice``; this module owns the awaiting and the writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from guardproxy.guard.engine import GuardEngine, GuardStream
from guardproxy.guard.scheduler import EngineError, EngineOverloaded, PromptTooLong
from guardproxy.guard.template import ChatTemplate, GuardPrompt
from guardproxy.guard.verdict import Verdict
from guardproxy.observe.audit import AuditLog, capped
from guardproxy.observe.logs import request_id
from guardproxy.observe.metrics import Metrics
from guardproxy.policy import Action, Policy
from guardproxy.server.errors import ProxyError, upstream_error
from guardproxy.server.upstream import Upstream
from guardproxy.stream.guardview import GuardFeed
from guardproxy.stream.moderator import CONTENT_FILTER, ChoiceModerator, OutDelta
from guardproxy.stream.sse import DONE, SSEDecoder, SSEError, encode_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """Where the text lives in one API's payloads: chat (``delta``/``message``) or completions (``text``)."""

    name: str  # "chat" | "completion"
    path: str
    chunk_object: str
    object: str


CHAT = Shape("chat", "/v1/chat/completions", "chat.completion.chunk", "chat.completion")
COMPLETION = Shape("completion", "/v1/completions", "text_completion", "text_completion")


@dataclass
class GuardServices:
    engine: GuardEngine
    template: ChatTemplate
    upstream: Upstream
    max_choices: int
    metrics: Metrics
    audit: AuditLog | None = None
    audit_text_chars: int = 4000
    # Done a little before the shutdown grace period ends: streams still running end themselves cleanly
    # (an error event, [DONE], a complete body) instead of being cut by the server's forced close.
    stopping: asyncio.Future[None] | None = None


def verdict_details(v: Verdict | None, action: Action) -> dict[str, Any]:
    if v is None:  # the guard failed and the policy failed open
        return {"risk": "unjudged", "category": None, "action": str(action)}
    return {
        "risk": v.risk,
        "category": v.category,
        "action": str(action),
        "p_unsafe": round(v.p_unsafe, 6),
        "p_controversial": round(v.p_controversial, 6),
    }


def guard_failed(exc: Exception) -> ProxyError:
    return ProxyError(
        503, f"the guard could not judge this request: {exc}", type="server_error", code="guard_error"
    )


class _Choice:
    """One choice: its moderator, its guard stream, and the verdicts it waits for, in order."""

    def __init__(
        self,
        index: int,
        moderator: ChoiceModerator,
        stream: GuardStream,
        owned: bool,
        metrics: Metrics,
        on_failure: Callable[[EngineError], str],
    ) -> None:
        self.index = index
        self.moderator = moderator
        self.stream = stream
        self.owned = owned  # closed with the choice (choice 0 shares the prompt's stream)
        self.metrics = metrics
        self.pending: deque[asyncio.Future[list[Verdict]]] = deque()
        self._fed_at: deque[float] = deque()
        self.on_failure = on_failure  # the exchange's rule for a failed guard (raises, or the reason)
        self.error: str | None = None  # why the guard failed, when it failed open
        self.submit(moderator.start())

    def delta(self, delta: Mapping[str, Any], now: float = 0.0) -> None:
        # Verdicts already back go to the moderator first: the delta may take tentative tokens back,
        # and a verdict of a token taken back must not still be on its way (ChoiceModerator.judged).
        self.settle()
        self.submit(self.moderator.delta(delta, now))

    def finish(self, finish_reason: str | None) -> None:
        self.settle()
        self.submit(self.moderator.finish(finish_reason))

    def submit(self, feeds: list[GuardFeed]) -> None:
        if self.moderator.unguarded:
            return
        for f in feeds:
            if f.retract:
                try:
                    self.stream.retract(f.retract)
                except EngineError as exc:  # the guard lost track of this stream: a guard failure
                    self._failed(exc)
                    return
            if not f.ids:
                continue
            if f.spans is None:
                self.stream.feed_context(f.ids)
            else:
                self.pending.append(self.stream.feed(f.ids))
                self._fed_at.append(time.perf_counter())

    def settle(self) -> None:
        """Hand the verdicts that are back to the moderator, in feed order. A guard failure raises
        (fail_closed) or turns the choice unguarded (fail_open)."""
        while self.pending and self.pending[0].done():
            fut = self.pending.popleft()
            self.metrics.verdict_wait.observe(time.perf_counter() - self._fed_at.popleft())
            try:
                verdicts = fut.result()
            except EngineError as exc:
                self._failed(exc)
                return
            self.moderator.judged(verdicts)

    def _failed(self, exc: EngineError) -> None:
        self.unguard(self.on_failure(exc))

    def unguard(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.moderator.unguard()
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self._fed_at.clear()


class Exchange:
    def __init__(
        self,
        services: GuardServices,
        request: web.Request,
        body: dict[str, Any],
        policy: Policy,
        prompt: GuardPrompt,
        shape: Shape,
        forward_key: bool = True,
    ) -> None:
        self.s = services
        self.forward_key = forward_key  # the client's Authorization goes upstream (no keys of our own)
        self.request = request
        self.body = body
        self.policy = policy
        self.prompt = prompt
        self.shape = shape
        self.streaming = bool(body.get("stream", False))
        self.choices: dict[int, _Choice] = {}
        self.prompt_verdict: Verdict | None = None
        self.prompt_action = Action.ALLOW
        self.guard_error: str | None = None  # the prompt's guard failed and the policy failed open
        self._failure_counted = False
        self._guard: GuardStream | None = None
        self._upstream: asyncio.Task[aiohttp.ClientResponse] | None = None
        self._resp: aiohttp.ClientResponse | None = None
        self.started = time.perf_counter()
        self.status = 200  # what the client got, for the audit record (499: the client went away)
        self._upstream_started = 0.0
        self._first_upstream_text: float | None = None
        self._first_release: float | None = None

    # -- the whole exchange ----------------------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        try:
            self._guard = await self.s.engine.open(
                self.prompt.ids, self.prompt.verdict_index, self.prompt.anchor_start
            )
        except EngineOverloaded as exc:
            raise ProxyError(
                429,
                f"guard is at capacity: {exc}",
                type="rate_limit_error",
                code="guard_overloaded",
                headers={"Retry-After": str(int(exc.retry_after + 0.999))},
            ) from None
        except PromptTooLong as exc:
            raise ProxyError(400, str(exc), param="messages", code="context_length_exceeded") from None
        try:
            if self.policy.prompt_check == "parallel":
                self._start_upstream()
            try:
                self.prompt_verdict = await self._guard.prompt_verdict()
            except EngineError as exc:
                self.guard_error = self._guard_failure(exc)  # fail open: on, unjudged and marked
            if self.prompt_verdict is not None:
                v = self.prompt_verdict
                self.prompt_action = self.policy.action(v, prompt=True)
                self.s.metrics.prompt_verdicts.labels(
                    v.risk, v.top_category if v.risk != "Safe" else "", str(self.prompt_action)
                ).inc()
            if self.prompt_action == Action.CUT:
                await self._cancel_upstream(abort=True)
                return await self._blocked()
            if self._upstream is None:
                self._start_upstream()
            assert self._upstream is not None
            self._resp = await self._upstream
            if self._resp.status != 200:
                raise upstream_error(self._resp.status, await self._resp.read())
            if self.streaming:
                return await self._stream()
            return await self._whole()
        except ProxyError as exc:
            self.status = exc.status
            raise
        except asyncio.CancelledError:
            self.status = 499
            raise
        finally:
            self._record_outcome()
            await self._cancel_upstream()
            for choice in self.choices.values():
                if choice.owned:
                    choice.stream.close()
            self._guard.close()

    def _record_outcome(self) -> None:
        m = self.s.metrics
        for choice in self.choices.values():
            d = choice.moderator.decided
            if d is not None:
                m.response_actions.labels(str(d.action), d.tier, d.category or "").inc()
        if self._first_release is not None:
            m.ttft.labels("proxy").observe(self._first_release - self.started)
        if self._first_upstream_text is not None:
            m.ttft.labels("upstream").observe(self._first_upstream_text - self._upstream_started)
        if self.s.audit is not None:
            try:
                self.s.audit.write(self._audit_record())
            except OSError:
                log.exception("could not write the audit record")

    def _outcome(self) -> str:
        if self.prompt_action == Action.CUT:
            return "blocked"
        actions = [
            c.moderator.decided.action for c in self.choices.values() if c.moderator.decided is not None
        ]
        strongest = max([*actions, self.prompt_action], default=Action.ALLOW)
        if self.status >= 400 and strongest == Action.ALLOW:
            return "error"
        return {Action.CUT: "cut", Action.REDACT: "redacted", Action.FLAG: "flagged"}.get(
            strongest, "allowed"
        )

    def _audit_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "request_id": request_id.get(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "route": self.shape.path,
            "model": self.body.get("model"),
            "policy": self.policy.name,
            "status": self.status,
            "stream": self.streaming,
            "outcome": self._outcome(),
            **self._details(),
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 1),
        }
        if self.policy.audit_text:
            cap = self.s.audit_text_chars
            messages = self.body.get("messages") if self.shape is CHAT else None
            if isinstance(messages, list):
                prompt = "\n".join(
                    f"{m.get('role')}: {m.get('content')}" for m in messages if isinstance(m, Mapping)
                )
            else:
                prompt = str(self.body.get("prompt", ""))
            record["prompt_text"] = capped(prompt, cap)
            record["response_text"] = {
                str(i): {name: capped(f.text, cap) for name, f in c.moderator.fields.items()}
                for i, c in sorted(self.choices.items())
            }
        return record

    def _start_upstream(self) -> None:
        self._upstream_started = time.perf_counter()
        data = json.dumps(self.body, ensure_ascii=False).encode()
        request = self.s.upstream.request(
            "POST", self.shape.path, self.request.headers, data, forward_auth=self.forward_key
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

    def _guard_failure(self, exc: EngineError) -> str:
        """The policy's rule for a failed guard, counted once a request however many choices fail:
        fail_closed raises (503 before the stream starts, an error event after), fail_open gives the
        reason to mark what goes out unjudged."""
        if not self._failure_counted:
            self._failure_counted = True
            self.s.metrics.guard_failures.labels(self.policy.on_guard_error).inc()
        if self.policy.on_guard_error != "fail_open":
            raise guard_failed(exc) from None
        return str(exc)

    # -- choices ---------------------------------------------------------------------------------------

    async def _choice(self, index: int) -> _Choice:
        c = self.choices.get(index)
        if c is not None:
            return c
        if index < 0 or index >= self.s.max_choices:
            raise ProxyError(502, f"upstream sent choice index {index}", type="upstream_error")
        assert self._guard is not None
        if index == 0 or self.guard_error is not None:
            stream, owned = self._guard, False
        else:
            # Each further choice continues the same prompt in a stream of its own.
            try:
                stream = await self.s.engine.open(self.prompt.ids, None, self.prompt.anchor_start)
            except EngineError as exc:
                raise guard_failed(exc) from None
            owned = True
        # Streamed answers release each word as soon as it is judged as it stands (speculation); a
        # whole answer is judged at once and gains nothing from it.
        moderator = ChoiceModerator(self.s.template, self.policy, speculate=self.streaming)
        c = _Choice(index, moderator, stream, owned, self.s.metrics, self._guard_failure)
        if self.guard_error is not None:
            c.unguard(self.guard_error)
        self.choices[index] = c
        return c

    def _details(self) -> dict[str, Any]:
        """Every decision: the prompt's verdict, and for the answer the first flag, the cut or the
        redactions (token index, tier, category, probabilities); with several choices, each one's."""
        per_choice = {i: c.moderator.judge.details() for i, c in sorted(self.choices.items())}
        order = {"cut": 3, "redact": 2, "flag": 1}
        response: dict[str, Any] = max(
            per_choice.values(),
            key=lambda d: order.get(d["action"], 0),
            default={"risk": "Safe", "category": None, "action": "allow", "judged_tokens": 0},
        )
        if len(per_choice) > 1:
            response = {**response, "choices": {str(i): d for i, d in per_choice.items()}}
        details: dict[str, Any] = {
            "prompt": verdict_details(self.prompt_verdict, self.prompt_action),
            "response": response,
        }
        error = self.guard_error or next((c.error for c in self.choices.values() if c.error), None)
        if error is not None:
            details["guard_error"] = error  # failed open: what follows it was not judged
        return details

    def _headers(self) -> dict[str, str]:
        if not self.policy.details:
            return {}
        d = self._details()
        h = {"x-guardproxy-prompt-risk": str(d["prompt"]["risk"]), "x-guardproxy-policy": self.policy.name}
        if "guard_error" in d:
            h["x-guardproxy-guard"] = "failed-open"
        if not self.streaming:
            h["x-guardproxy-response-risk"] = d["response"]["risk"]
            h["x-guardproxy-action"] = d["response"]["action"]
        return h

    # -- a blocked prompt ------------------------------------------------------------------------------

    async def _blocked(self) -> web.StreamResponse:
        v = self.prompt_verdict
        assert v is not None
        reason = v.risk + (f": {v.top_category}" if v.risk != "Safe" else "")
        if self.policy.blocked_prompt == "error":
            raise ProxyError(
                400,
                f"The prompt was blocked by the content policy ({reason}).",
                param="messages",
                code="content_filter",
                headers=self._headers(),
            )
        text = self.policy.refusal
        envelope = self._envelope({})
        if self.streaming:
            out = await self._prepare_sse()
            first = {"role": "assistant", "content": ""} if self.shape is CHAT else {}
            for delta, fr in ((first, None), (self._text_delta(text), None), ({}, CONTENT_FILTER)):
                if delta or fr:
                    await out.write(self._chunk(envelope, 0, delta, fr, final=fr is not None))
            await out.write(DONE)
            return out
        body = {
            **envelope,
            "object": self.shape.object,
            "choices": [self._whole_choice(0, text, CONTENT_FILTER)],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        if self.policy.details:
            body["guardproxy"] = self._details()
        return web.json_response(body, headers=self._headers())

    # -- streaming -------------------------------------------------------------------------------------

    async def _prepare_sse(self) -> web.StreamResponse:
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

    async def _stream(self) -> web.StreamResponse:
        assert self._resp is not None
        out = await self._prepare_sse()
        decoder = SSEDecoder()
        envelope: dict[str, Any] = {}
        held_tail: list[dict[str, Any]] = []  # usage chunks (choices: []) go out last
        reader: AsyncIterator[bytes] = self._resp.content.iter_any().__aiter__()
        next_read: asyncio.Task[bytes] | None = asyncio.create_task(_read(reader), name="guardproxy-read")
        upstream_done = False
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {next_read} if next_read is not None else set()
                waits |= {c.pending[0] for c in self.choices.values() if c.pending}
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
                    for event in events:
                        if event.data.strip() == "[DONE]":
                            upstream_done = True
                            continue
                        chunk = self._parse_chunk(event.data)
                        if not chunk.get("choices") and chunk.get("usage") is not None:
                            held_tail.append(chunk)
                            continue
                        envelope = self._envelope(chunk)
                        for c in chunk.get("choices") or []:
                            await self._upstream_choice(c)
                    if upstream_done:
                        if next_read is not None:
                            next_read.cancel()
                            next_read = None
                        for choice in self.choices.values():
                            choice.finish(None)
                for choice in self.choices.values():
                    choice.settle()
                cut = await self._emit(out, envelope)
                if cut:
                    break
                if upstream_done and all(c.moderator.closed for c in self.choices.values()):
                    break
            for chunk in held_tail:
                await out.write(encode_event(json.dumps(chunk, ensure_ascii=False)))
            await out.write(DONE)
        except ProxyError as exc:
            await out.write(exc.sse())  # the stream has started: the error goes in-band, then [DONE]
        except SSEError as exc:
            await out.write(ProxyError(502, str(exc), type="upstream_error").sse())
        except (aiohttp.ClientError, TimeoutError) as exc:
            msg = f"upstream stream failed: {type(exc).__name__}: {exc}"
            await out.write(ProxyError(502, msg, type="upstream_error").sse())
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
                await asyncio.shield(_end_stream(out, end.sse()))
            raise
        finally:
            if next_read is not None:
                next_read.cancel()
                with contextlib.suppress(BaseException):
                    await next_read
        return out

    async def _upstream_choice(self, c: Any) -> None:
        if not isinstance(c, Mapping):
            raise ProxyError(502, "upstream sent a malformed choice", type="upstream_error")
        choice = await self._choice(int(c.get("index", 0)))
        delta = (c.get("delta") or {}) if self.shape is CHAT else {"content": c.get("text") or ""}
        if not isinstance(delta, Mapping):
            raise ProxyError(502, "upstream sent a malformed delta", type="upstream_error")
        now = time.perf_counter()
        if self._first_upstream_text is None and any(delta.get(k) for k in ("content", "reasoning_content")):
            self._first_upstream_text = now
        choice.delta(delta, now)
        if c.get("finish_reason"):
            choice.finish(str(c["finish_reason"]))

    async def _emit(self, out: web.StreamResponse, envelope: dict[str, Any]) -> bool:
        """Write what every choice may release; on a cut, end every choice and stop reading.
        Everything released at once goes out in one write (one syscall, not one per chunk)."""
        cut = False
        parts: list[bytes] = []
        for choice in sorted(self.choices.values(), key=lambda c: c.index):
            for piece in choice.moderator.drain():
                if piece.arrived is not None:
                    now = time.perf_counter()
                    self.s.metrics.chunk_added_latency.observe(now - piece.arrived)
                    if self._first_release is None:
                        self._first_release = now
                final = piece.finish_reason is not None
                parts.append(
                    self._chunk(envelope, choice.index, piece.delta, piece.finish_reason, final=final)
                )
            cut = cut or choice.moderator.cut_at is not None
        if cut:
            # One connection carries every choice: closing it ends them all. The others stop where
            # their released text stops, marked content_filter too.
            if self._resp is not None:
                self._resp.close()
            for choice in self.choices.values():
                if not choice.moderator.closed:
                    choice.moderator.closed = True
                    parts.append(self._chunk(envelope, choice.index, {}, CONTENT_FILTER, final=True))
        if parts:
            await out.write(b"".join(parts))
        return cut

    def _parse_chunk(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ProxyError(502, "upstream sent an event that is not JSON", type="upstream_error") from None
        if not isinstance(chunk, dict):
            raise ProxyError(502, "upstream sent an event that is not a JSON object", type="upstream_error")
        if isinstance(chunk.get("error"), dict):
            err = chunk["error"]
            raise ProxyError(
                502,
                str(err.get("message", "upstream error")),
                type=str(err.get("type") or "upstream_error"),
                code=err.get("code"),
            )
        return chunk

    def _envelope(self, chunk: Mapping[str, Any]) -> dict[str, Any]:
        env = {
            k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if chunk.get(k) is not None
        }
        # Filled only when missing: setdefault would build a uuid for every chunk.
        if "id" not in env:
            env["id"] = f"chatcmpl-{uuid.uuid4().hex}" if self.shape is CHAT else f"cmpl-{uuid.uuid4().hex}"
        if "created" not in env:
            env["created"] = int(time.time())
        if "model" not in env:
            env["model"] = self.body.get("model") or ""
        return env

    def _text_delta(self, text: str) -> dict[str, Any]:
        return {"content": text} if self.shape is CHAT else {"text": text}

    def _chunk(
        self, env: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None, *, final: bool
    ) -> bytes:
        if self.shape is CHAT:
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": index,
                "text": delta.get("content", delta.get("text", "")),
                "logprobs": None,
                "finish_reason": finish,
            }
        chunk: dict[str, Any] = {**env, "object": self.shape.chunk_object, "choices": [choice]}
        if final and self.policy.details:
            chunk["guardproxy"] = self._details()
        return encode_event(json.dumps(chunk, ensure_ascii=False))

    # -- non-streaming ---------------------------------------------------------------------------------

    async def _whole(self) -> web.StreamResponse:
        assert self._resp is not None
        raw = await self._resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            raise ProxyError(502, "upstream response is not JSON", type="upstream_error") from None
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise ProxyError(502, "upstream response has no choices", type="upstream_error")
        for c in body["choices"]:
            if not isinstance(c, Mapping):
                raise ProxyError(502, "upstream sent a malformed choice", type="upstream_error")
            choice = await self._choice(int(c.get("index", 0)))
            if self.shape is CHAT:
                msg = c.get("message") or {}
                delta = {
                    k: msg.get(k) for k in ("role", "content", "reasoning_content", "reasoning", "refusal")
                }
                delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(msg.get("tool_calls") or [])]
            else:
                delta = {"content": c.get("text") or ""}
            choice.delta(delta)
            choice.finish(c.get("finish_reason"))
        rebuilt = []
        for c in body["choices"]:
            choice = self.choices[int(c.get("index", 0))]
            while choice.pending:
                await asyncio.wait([choice.pending[0]])
                choice.settle()
            rebuilt.append(self._merge(c, choice.moderator.drain()))
        body["choices"] = rebuilt
        if self.policy.details:
            body["guardproxy"] = self._details()
        return web.json_response(body, headers=self._headers())

    def _merge(self, original: Mapping[str, Any], pieces: list[OutDelta]) -> dict[str, Any]:
        """A whole choice from the released deltas (the original's other fields kept)."""
        text: dict[str, str] = {}
        calls: dict[int, dict[str, Any]] = {}
        finish = original.get("finish_reason")
        for p in pieces:
            for key in ("content", "reasoning_content", "reasoning", "refusal"):
                if key in p.delta and isinstance(p.delta[key], str):
                    text[key] = text.get(key, "") + p.delta[key]
            for tc in p.delta.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"function": {"arguments": ""}})
                call.update({k: v for k, v in tc.items() if k not in ("index", "function")})
                fn = tc.get("function") or {}
                if "name" in fn:
                    call["function"]["name"] = fn["name"]
                call["function"]["arguments"] += fn.get("arguments", "")
            if p.finish_reason is not None:
                finish = p.finish_reason
        if self.shape is not CHAT:
            return {**original, "text": text.get("content", ""), "finish_reason": finish}
        msg = dict(original.get("message") or {})
        for key in ("content", "reasoning_content", "reasoning"):
            if key in text or msg.get(key) is not None:
                msg[key] = text.get(key, "")
        if msg.get("tool_calls"):
            released = [calls[k] for k in sorted(calls)]
            msg["tool_calls"] = released or None
        return {**original, "message": msg, "finish_reason": finish}

    def _whole_choice(self, index: int, text: str, finish: str) -> dict[str, Any]:
        if self.shape is CHAT:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


async def _read(reader: AsyncIterator[bytes]) -> bytes:
    return await anext(reader)


async def _end_stream(out: web.StreamResponse, last: bytes) -> None:
    """The last bytes and the end of the chunked body: a complete response, even when cancelled."""
    await out.write(last)
    await out.write_eof()
