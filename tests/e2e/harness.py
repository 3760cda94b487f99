"""Loopback servers for end-to-end tests: a fake OpenAI-compatible upstream that replays the SSE
shapes of real servers, and guardproxy itself, both on 127.0.0.1 in one background event loop (so
that the synchronous openai client can call them too). Every run is bounded by the test's requests."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from aiohttp import web

from guardproxy.config import Settings
from guardproxy.server.app import create_app

from . import fake_apis

T = TypeVar("T")
FAKE_HEADERS = web.RequestKey("fake_headers", dict)  # response headers a script asks the fake to add


@dataclass
class Script:
    """What the fake upstream answers next: text pieces per choice, in the shape of a server."""

    pieces: list[list[str]] = field(default_factory=lambda: [["Hello", " there", "!"]])
    style: str = "openai"  # openai | llamacpp | vllm (reasoning first) | ollama
    reasoning: list[str] = field(default_factory=list)
    crlf: bool = False
    keepalive: bool = False
    split_seed: int | None = None  # write the body in random network chunks
    usage: bool = True
    status: int = 200
    error_body: bytes = b""
    tool_args: list[str] = field(default_factory=list)  # one tool call whose arguments stream in pieces
    multiline: bool = False  # JSON spread over several data: lines
    delay: float = 0.0  # seconds between events (a slow upstream)
    # Lockstep: after each content event, wait (at most this long) for the client's go-ahead
    # (``FakeUpstream.go_ahead``) before the next one; a wait that runs out is counted.
    lockstep: float = 0.0
    first_delay: float = 0.0  # seconds before the response starts (a slow first byte)
    # A fault after `fault_after` events: "bad-json", "bad-utf8", "not-sse" (garbage lines), "reset"
    # (the connection drops), "stall" (stops sending; the proxy's read timeout ends it), "error-event",
    # "truncate" (the body ends cleanly, early: no last event).
    fault: str | None = None
    fault_after: int = 2
    # Responses API: "custom" sends the tool call (``tool_args``) as a custom tool call (apply_patch).
    tool_kind: str = "function"
    # Raw events ([event name, data object]) sent as they are just before the answer's last event(s).
    extra_events: list[list[Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # response headers the upstream adds


class FakeUpstream:
    def __init__(self) -> None:
        self.script = Script()
        self.seen: list[tuple[str, str]] = []  # every request that reached it: (method, path)
        self.stored: dict[str, dict[str, Any]] = {}  # Responses API answers, by id (previous_response_id)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.closed_early = 0
        self.gate: asyncio.Semaphore | None = None  # lockstep go-aheads (made on the serving loop)
        self.gate_timeouts = 0
        self.queries: list[str] = []  # the query string of every request that reached it, in order

    def go_ahead(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let a lockstep upstream send its next event (callable from any thread)."""
        loop.call_soon_threadsafe(lambda: self.gate.release() if self.gate is not None else None)

    def app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append((request.method, request.path))
            self.queries.append(request.query_string)
            return await handler(request)

        async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
            response.headers.update(request.get(FAKE_HEADERS) or {})

        app = web.Application(middlewares=[record])
        app.on_response_prepare.append(add_headers)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        return app

    async def count_tokens(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.json_response({"input_tokens": len(json.dumps(await request.json())) // 4})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "responses")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "messages")

    def _api_events(self, body: dict[str, Any], kind: str, s: Script) -> list[tuple[str, dict[str, Any]]]:
        text = s.pieces[0] if s.pieces else []
        if kind == "responses":
            rid = f"resp_{len(self.stored) + 1}"
            events = fake_apis.responses_events(
                body, s.reasoning, text, s.tool_args, rid, custom_tool=s.tool_kind == "custom"
            )
            self.stored[rid] = body
            return events
        return fake_apis.messages_events(body, s.reasoning, text, s.tool_args, f"msg_{len(self.requests)}")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def _chunks(self, body: dict[str, Any], kind: str, s: Script) -> list[dict[str, Any]]:
        base = {"id": "chatcmpl-fake", "created": 1763800000, "model": body.get("model", "fake-model")}
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        if s.style == "ollama":
            base["system_fingerprint"] = "fp_ollama"
        out: list[dict[str, Any]] = []

        def choice(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            if kind == "chat":
                return {
                    **base,
                    "object": obj,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
                }
            return {
                **base,
                "object": obj,
                "choices": [
                    {
                        "index": i,
                        "text": delta.get("content") or "",
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }

        for i, pieces in enumerate(s.pieces):
            first = {"role": "assistant", "content": None if s.style == "llamacpp" else ""}
            out.append(choice(i, first))
            out += [choice(i, {"reasoning_content": r}) for r in s.reasoning]
            out += [choice(i, {"content": p}) for p in pieces]
            if s.tool_args:
                head = {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": ""},
                }
                out.append(choice(i, {"tool_calls": [head]}))
                out += [
                    choice(i, {"tool_calls": [{"index": 0, "function": {"arguments": a}}]})
                    for a in s.tool_args
                ]
            out.append(choice(i, {}, "tool_calls" if s.tool_args else "stop"))
        if s.usage and (body.get("stream_options") or {}).get("include_usage"):
            n = sum(len(p) for p in s.pieces)
            out.append(
                {
                    **base,
                    "object": obj,
                    "choices": [],
                    "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
                }
            )
        return out

    async def _answer(self, request: web.Request, kind: str) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        # A per-request script (load tests run many different answers at once).
        own = request.headers.get("x-fake-script")
        s = Script(**json.loads(own)) if own else self.script
        request[FAKE_HEADERS] = s.headers
        if s.first_delay:
            try:
                await asyncio.sleep(s.first_delay)
            except asyncio.CancelledError:
                self.closed_early += 1
                raise
        if s.status != 200:
            return web.Response(status=s.status, body=s.error_body, content_type="application/json")
        previous = body.get("previous_response_id")
        if kind == "responses" and previous is not None and previous not in self.stored:
            error = {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
            }
            return web.json_response(
                {"error": {**error, "param": "previous_response_id", "code": None}}, status=400
            )
        api_events = self._api_events(body, kind, s) if kind in ("responses", "messages") else []
        if not body.get("stream") and kind in ("responses", "messages"):
            text = s.pieces[0] if s.pieces else []
            if kind == "responses":
                return web.json_response(fake_apis.responses_whole(api_events))
            mid = str(api_events[0][1]["message"]["id"])
            return web.json_response(fake_apis.messages_whole(body, s.reasoning, text, s.tool_args, mid))
        if not body.get("stream"):
            texts = ["".join(p) for p in s.pieces]
            if kind == "chat":
                calls = None
                if s.tool_args:
                    fn = {"name": "weather", "arguments": "".join(s.tool_args)}
                    calls = [{"id": "call_1", "type": "function", "function": fn}]
                choices = [
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": t,
                            "tool_calls": calls,
                            "reasoning_content": "".join(s.reasoning) or None,
                        },
                        "logprobs": None,
                        "finish_reason": "tool_calls" if calls else "stop",
                    }
                    for i, t in enumerate(texts)
                ]
            else:
                choices = [
                    {"index": i, "text": t, "logprobs": None, "finish_reason": "stop"}
                    for i, t in enumerate(texts)
                ]
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": 1763800000,
                    "model": body.get("model", "fake-model"),
                    "choices": choices,
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                }
            )
        eol = "\r\n" if s.crlf else "\n"
        events: list[bytes] = []
        gated: list[bool] = []
        named = api_events or [("", c) for c in self._chunks(body, kind, s)]
        if s.extra_events:
            named = fake_apis.insert_before_end(kind, named, [(str(n), dict(d)) for n, d in s.extra_events])
        for name, c in named:
            text_event = c.get("type") in ("response.output_text.delta", "content_block_delta")
            gated.append(
                text_event or any((ch.get("delta") or {}).get("content") for ch in c.get("choices", []))
            )
            ev = ": keep-alive" + eol + eol if s.keepalive else ""
            if name:
                ev += f"event: {name}{eol}"
            if s.multiline:  # the JSON spread over several data: lines, as the spec allows
                lines = json.dumps(c, ensure_ascii=False, indent=1).split("\n")
                ev += "".join(f"data: {line}{eol}" for line in lines) + eol
            else:
                ev += "data: " + json.dumps(c, ensure_ascii=False) + eol + eol
            events.append(ev.encode())
        if not api_events:
            events.append(f"data: [DONE]{eol}{eol}".encode())
        if s.fault is not None:
            faults = {
                "bad-json": b"data: {not json" + eol.encode() * 2,
                "bad-utf8": b'data: {"x": "\xff\xfe"}' + eol.encode() * 2,
                "not-sse": b"this line has no field" + eol.encode() + b"{}" + eol.encode() * 2,
                "error-event": {
                    "responses": b'event: error\ndata: {"type": "error", "code": "server_error", '
                    b'"message": "model crashed", "param": null, "sequence_number": 99}',
                    "messages": b'event: error\ndata: {"type": "error", "error": '
                    b'{"type": "overloaded_error", "message": "model crashed"}}',
                }.get(kind, b'data: {"error": {"message": "model crashed", "type": "server_error"}}')
                + eol.encode() * 2,
            }
            events.insert(s.fault_after, faults.get(s.fault, b""))
        data = b"".join(events)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        rng = random.Random(s.split_seed)
        pos = 0
        try:
            if s.fault in ("reset", "stall", "truncate"):
                await resp.write(b"".join(events[: s.fault_after]))
                if s.fault == "truncate":  # a clean end of the body, but before the last event
                    return resp
                if s.fault == "stall":
                    await asyncio.sleep(30)  # bounded; the proxy's read timeout ends it first
                else:
                    assert request.transport is not None
                    request.transport.close()  # mid-body: the chunked response never completes
                return resp
            if s.lockstep:
                if self.gate is None:
                    self.gate = asyncio.Semaphore(0)
                for event, wait in zip(events, [*gated, False], strict=True):
                    await resp.write(event)
                    if wait:
                        try:
                            await asyncio.wait_for(self.gate.acquire(), s.lockstep)
                        except TimeoutError:
                            self.gate_timeouts += 1
                return resp
            if s.delay:  # event by event, slowly, as a real model generates
                for event in data.split(b"\n\n"):
                    await resp.write(event + b"\n\n")
                    await asyncio.sleep(s.delay)
            while pos < len(data) and not s.delay:
                step = rng.randint(1, 40) if s.split_seed is not None else len(data)
                await resp.write(data[pos : pos + step])
                pos += step
                await asyncio.sleep(0)
        except (ConnectionResetError, RuntimeError):
            self.closed_early += 1
        except asyncio.CancelledError:  # the runner cancels a handler whose client went away
            self.closed_early += 1
            raise
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "completion")


class Loopback:
    """A background loop that runs the fake upstream and the proxy until closed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="e2e-loop", daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def serve(self, app: web.Application) -> int:
        async def start() -> int:
            runner = web.AppRunner(app, handler_cancellation=True)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        return self.call(start)

    def close(self) -> None:
        async def stop() -> None:
            for r in reversed(self.runners):
                await r.cleanup()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def start_proxy(loop: Loopback, settings: Settings) -> str:
    return start_proxy_app(loop, settings)[0]


def start_proxy_app(
    loop: Loopback, settings: Settings, config_path: str | None = None, reload_interval_s: float = 2.0
) -> tuple[str, web.Application]:
    app = create_app(settings, config_path=config_path, reload_interval_s=reload_interval_s)
    port = loop.serve(app)
    return f"http://127.0.0.1:{port}/v1", app


def sse_events(proxy: str, script: dict[str, Any] | None = None, timeout: float = 30) -> list[Any]:
    """A streamed chat completion as the client's raw SSE events: JSON objects, then "[DONE]"."""
    import urllib.request

    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if script is not None:
        headers["x-fake-script"] = json.dumps(script)
    req = urllib.request.Request(proxy + "/chat/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return [
        b[6:] if b[6:] == "[DONE]" else json.loads(b[6:])
        for b in text.split("\n\n")
        if b.startswith("data: ")
    ]


def serve_process(
    config: Path, upstream: str, guard: Path, port: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """`guardproxy serve` as a user runs it, in its own process, its output in ``log``."""
    cmd = [
        sys.executable,
        "-m",
        "guardproxy",
        "serve",
        "--config",
        str(config),
        "--upstream",
        upstream,
        "--guard-model",
        str(guard),
        "--port",
        str(port),
    ]
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def wait_ready(base: str, proc: subprocess.Popen[bytes], seconds: float = 90) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, "guardproxy serve exited"
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "guardproxy serve did not become ready"
        time.sleep(0.2)


IDLE = {"active_streams": 0, "queued": 0, "cached_tokens": 0}


def engine_state(proxy: str) -> dict[str, int]:
    """The guard engine's live streams, queue and cache, from /readyz."""
    import urllib.request

    with urllib.request.urlopen(proxy.removesuffix("/v1") + "/readyz", timeout=10) as r:
        state: dict[str, int] = json.loads(r.read())["engine"]
        return state


def until(check: Callable[[], bool], seconds: float = 10, what: Callable[[], object] | str = "") -> None:
    """Poll ``check`` (state in another thread or process, with no event to wait on) until it holds;
    fail with ``what`` (a message, or a function giving one) once ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.02)


def wait_idle(proxy: str, seconds: float = 10) -> None:
    """Every guard stream returned: nothing live, nothing queued, no cache held."""
    until(
        lambda: engine_state(proxy) == IDLE,
        seconds,
        lambda: f"guard resources were not returned: {engine_state(proxy)}",
    )


def http_json(req: Any) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a raw ``urllib`` request, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())
