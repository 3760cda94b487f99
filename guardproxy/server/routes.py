"""The routes: each reads its request, picks the policy and hands over (the moderated ones to
``Exchange``, through the API's wire format from ``apis/registry.py``); the rest answer from the guard
(moderations), pass through (models, token counting), or tell the state (health, readiness, metrics).
Errors they raise leave in the shape of the route's API (``middleware.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from guardproxy.apis import moderations as moderation
from guardproxy.apis.chat import ChatWire, CompletionWire
from guardproxy.apis.errors import ProxyError, bad_request, engine_error, upstream_error
from guardproxy.apis.messages import MessagesWire
from guardproxy.apis.responses import ResponsesWire
from guardproxy.apis.wire import Wire
from guardproxy.guard.errors import EngineError
from guardproxy.guard.template import ConversationError
from guardproxy.policy import Policy
from guardproxy.server.exchange import EventSink, Exchange
from guardproxy.server.middleware import (
    forward_client_key,
)
from guardproxy.server.prompts import judge_prompt
from guardproxy.server.state import (
    CLIENT_KEY,
    GUARD_NAME,
    LIVE_SETTINGS,
    METRICS,
    SERVICES,
    SETTINGS,
    WORKER,
    json_body,
)
from guardproxy.server.websocket import FrameSink, serve_responses

log = logging.getLogger(__name__)


async def _moderated(
    request: web.Request, make: Callable[[dict[str, Any], Policy], Wire]
) -> web.StreamResponse:
    """The moderated routes: the body read, then ``moderate``."""
    response = await moderate(request, await json_body(request), make)
    assert isinstance(response, web.StreamResponse)  # no sink given: the answer is the HTTP response
    return response


async def moderate(
    request: web.Request,
    body: dict[str, Any],
    make: Callable[[dict[str, Any], Policy], Wire],
    sink: EventSink | None = None,
) -> web.StreamResponse | EventSink:
    """One moderated request: the policy picked (by route, model and key), the API's wire format built,
    the conversation rendered for the guard, then the exchange (its events to ``sink`` when given)."""
    services = request.app[SERVICES]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    policy = request.app[LIVE_SETTINGS].current.policy_for(request.path, model, request.get(CLIENT_KEY))
    wire = make(body, policy)
    try:
        conversation = wire.conversation()
        prompt = services.template.render_prompt(
            conversation.messages, tools=conversation.tools, max_tokens=services.engine.max_prompt_tokens
        )
    except ConversationError as exc:
        param = exc.param if exc.param != "messages" else wire.conversation_param
        raise bad_request(str(exc), param=param) from None
    if prompt.windowed and policy.prompt_overflow == "block":
        raise ProxyError(
            400,
            f"The conversation renders to {prompt.judged_tokens} guard tokens, more than the guard's "
            f"context ({services.engine.max_prompt_tokens}), and the policy refuses prompts it cannot "
            "judge whole (policy.prompt_overflow: block).",
            param=wire.conversation_param,
            code="context_length_exceeded",
        )
    return await Exchange(services, request, wire, policy, prompt, forward_client_key(request), sink).run()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    choices = request.app[SERVICES].max_choices
    return await _moderated(request, lambda body, policy: ChatWire(body, policy, choices))


async def completions(request: web.Request) -> web.StreamResponse:
    choices = request.app[SERVICES].max_choices
    return await _moderated(request, lambda body, policy: CompletionWire(body, policy, choices))


async def responses(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICES].responses
    return await _moderated(request, lambda body, policy: ResponsesWire(body, policy, store))


async def responses_websocket(request: web.Request) -> web.StreamResponse:
    """The Responses API's WebSocket mode (``websocket.py``): each frame a moderated request."""
    store = request.app[SERVICES].responses

    def wire(body: dict[str, Any], policy: Policy) -> Wire:
        return ResponsesWire(body, policy, store)

    async def one(body: dict[str, Any], sink: FrameSink) -> object:
        return await moderate(request, body, wire, sink)

    return await serve_responses(request, one, request.app[SETTINGS].server.max_body_bytes)


async def messages(request: web.Request) -> web.StreamResponse:
    return await _moderated(request, MessagesWire)


HANDLERS = {
    "chat": chat_completions,
    "completions": completions,
    "responses": responses,
    "messages": messages,
}


async def count_tokens(request: web.Request) -> web.Response:
    """Anthropic's token counting: no generated text, so forwarded as it is."""
    return await _pass_through(request, "POST", request.path_qs, await request.read())


async def moderations(request: web.Request) -> web.Response:
    """OpenAI's moderation endpoint, answered by the guard's query head (each input as a user turn)."""
    body = await json_body(request)
    services = request.app[SERVICES]
    texts = moderation.inputs(body)
    policy = request.app[LIVE_SETTINGS].current.policy_for(
        moderation.ROUTE, body.get("model"), request.get(CLIENT_KEY)
    )

    async def judge(text: str) -> dict[str, Any]:
        prompt = services.template.render_prompt(
            [{"role": "user", "content": text}], max_tokens=services.engine.max_prompt_tokens
        )
        try:
            async with await services.engine.open(prompt.ids, prompt.verdict_index) as stream:
                # A text longer than the guard's context: every window judged, the worst one answers.
                v, _ = await judge_prompt(services.engine, stream, prompt, policy, request.app[METRICS])
        except EngineError as exc:
            raise engine_error(exc) from None
        return moderation.result(v, policy)

    results = await asyncio.gather(*(judge(t) for t in texts))
    return web.json_response(
        {"id": f"modr-{uuid.uuid4().hex}", "model": request.app[GUARD_NAME], "results": list(results)}
    )


async def models(request: web.Request) -> web.Response:
    return await _pass_through(request, "GET", "/v1/models")


async def _pass_through(
    request: web.Request, method: str, path: str, body: bytes | None = None
) -> web.Response:
    """A route with no generated text in its answer: forwarded, and its answer relayed, as they are."""
    upstream = request.app[SERVICES].upstream
    resp = await upstream.request(
        method, path, request.headers, body, forward_auth=forward_client_key(request)
    )
    async with resp:
        raw = await resp.read()
        if resp.status != 200:
            raise upstream_error(resp.status, raw)
        return web.Response(body=raw, status=200, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "time": int(time.time())})


async def readyz(request: web.Request) -> web.Response:
    services = request.app.get(SERVICES)
    if services is None:
        return web.json_response({"status": "loading"}, status=503)
    if not services.engine.ready:  # a shared engine still loading, or restarting
        return web.json_response({"status": "waiting for the guard engine"}, status=503)
    stats = services.engine.stats()
    worker = {"worker": request.app[WORKER], "pid": os.getpid()} if WORKER in request.app else {}
    return web.json_response(
        {
            "status": "ready",
            **worker,
            "guard": request.app[GUARD_NAME],
            "upstream": request.app[SETTINGS].upstream.base_url,
            "engine": {
                "active_streams": stats.active_streams,
                "queued": stats.queued_streams,
                "cached_tokens": stats.cached_tokens,
            },
        }
    )
