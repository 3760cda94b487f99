"""The aiohttp application: typed app keys, long-lived resources in ``cleanup_ctx``, thin routes.

Routes read the body, pick the policy, build the API's wire format, render the prompt and hand over to
``Exchange``; every error leaves in the shape of the route's API (``apis/errors.py``: Anthropic's on
``/v1/messages``, OpenAI's elsewhere). guardproxy is not an open proxy: the upstream comes from the
configuration, never from the request, and paths it does not serve are 404. Among those, on purpose:
routes that hand back stored upstream text unjudged (``GET /v1/responses/{id}`` and its
``input_items``, the polling and stream resume of background responses, ``/v1/messages/batches``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from guardproxy.aio import cancel_and_wait
from guardproxy.apis import moderations as moderation
from guardproxy.apis.chat import ChatWire, CompletionWire
from guardproxy.apis.errors import ProxyError, bad_request, engine_error, upstream_error
from guardproxy.apis.messages import MessagesWire
from guardproxy.apis.registry import APIS
from guardproxy.apis.responses import ResponsesWire
from guardproxy.apis.responses_store import ResponseStore
from guardproxy.apis.wire import Wire
from guardproxy.config import Settings
from guardproxy.guard.api import Engine
from guardproxy.guard.checkpoint import load_template
from guardproxy.guard.errors import EngineError
from guardproxy.guard.remote import RemoteEngine
from guardproxy.guard.template import ChatTemplate, ConversationError
from guardproxy.observe.audit import AuditLog
from guardproxy.observe.live import LiveFeed
from guardproxy.observe.metrics import Metrics
from guardproxy.policy import Policy
from guardproxy.server import ui
from guardproxy.server.exchange import EventSink, Exchange, GuardServices
from guardproxy.server.middleware import (
    add_request_id,
    error_middleware,
    forward_client_key,
    request_id_middleware,
)
from guardproxy.server.prompts import judge_prompt
from guardproxy.server.reload import ConfigReloader, SettingsStore
from guardproxy.server.state import (
    CLIENT_KEY,
    ENGINE_SOCKET,
    GUARD_NAME,
    LIVE_SETTINGS,
    METRICS,
    RELOADER,
    SERVICES,
    SETTINGS,
    WORKER,
    json_body,
)
from guardproxy.server.upstream import Upstream, session
from guardproxy.server.websocket import FrameSink, serve_responses

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    config_path: str | None = None,
    reload_interval_s: float = 2.0,
    engine_socket: str | None = None,
    worker: int | None = None,
) -> web.Application:
    """The proxy app. With ``config_path``, the policy reloads on SIGHUP and when the file changes.
    With ``engine_socket`` it is proxy worker number ``worker`` of several, and its guard is the shared
    engine process listening there (``server/supervisor.py``); otherwise the guard engine is its own."""
    app = web.Application(
        client_max_size=settings.server.max_body_bytes, middlewares=[request_id_middleware, error_middleware]
    )
    app[SETTINGS] = settings
    if engine_socket is not None:
        app[ENGINE_SOCKET] = engine_socket
        app[WORKER] = worker or 0
    app[GUARD_NAME] = settings.guard.model
    app[METRICS] = Metrics()
    app[LIVE_SETTINGS] = SettingsStore(settings)
    if config_path is not None:
        reloader = ConfigReloader(config_path, app[LIVE_SETTINGS], reload_interval_s)
        app[RELOADER] = reloader
        app.cleanup_ctx.append(_watch_config)
    app.cleanup_ctx.append(_services)
    app.on_shutdown.append(_begin_drain)
    app.on_response_prepare.append(add_request_id)
    app.add_routes(
        [
            *(web.post(spec.route, HANDLERS[spec.name]) for spec in APIS),  # one a registered API
            web.get("/v1/responses", responses_websocket),  # the Responses API's WebSocket mode
            web.post("/v1/messages/count_tokens", count_tokens),
            web.post(moderation.ROUTE, moderations),
            web.get("/v1/models", models),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    if settings.ui.enabled:
        ui.add_routes(app)
    return app


async def _engine(app: web.Application) -> tuple[Engine, ChatTemplate]:
    settings = app[SETTINGS]
    g = settings.guard
    if ENGINE_SOCKET not in app:
        # Imported here: a proxy worker of a shared engine never loads torch.
        from guardproxy.server.engines import local_engine

        return await local_engine(settings, on_step=app[METRICS].observe_step)
    _, template = await asyncio.get_running_loop().run_in_executor(
        None, lambda: load_template(g.model, revision=g.revision)
    )
    remote = RemoteEngine(
        app[ENGINE_SOCKET], max_prompt_tokens=g.engine.max_prompt_tokens, wait_s=g.engine.queue_timeout_s
    )
    return remote, template


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    engine, template = await _engine(app)
    metrics.bind_engine(engine.stats)
    client = session(settings.upstream)
    audit = (
        AuditLog(settings.audit.path, max_bytes=settings.audit.max_bytes, backups=settings.audit.backups)
        if settings.audit.path
        else None
    )
    await engine.start()
    services = app[SERVICES] = GuardServices(
        engine=engine,
        template=template,
        upstream=Upstream(settings.upstream, client),
        max_choices=settings.server.max_choices,
        metrics=metrics,
        audit=audit,
        audit_text_chars=settings.audit.max_text_chars,
        responses=ResponseStore(settings.server.response_store_entries, settings.server.response_store_age_s),
        stopping=asyncio.get_running_loop().create_future(),
        live=LiveFeed(settings.ui.live_records) if settings.ui.enabled else None,
    )
    if isinstance(engine, RemoteEngine):  # what one worker keeps, every worker keeps
        share(engine, services)
    log.info("guardproxy ready: guard %s, upstream %s", settings.guard.model, settings.upstream.base_url)
    try:
        yield
    finally:
        await client.close()
        await engine.stop()
        if audit is not None:
            audit.close()


def share(engine: RemoteEngine, services: GuardServices) -> None:
    """Decisions for the live view and Responses API turns go to the other workers through the engine."""
    if services.live is not None:
        services.live.shared = functools.partial(engine.share, "live")
        engine.on_share["live"] = services.live.receive
    if services.responses is not None:
        services.responses.shared = functools.partial(engine.share, "response")
        engine.on_share["response"] = services.responses.receive


async def freeze_startup_heap(app: web.Application) -> None:
    """Take what exists once the services are up (modules, the model, the tokenizer: ~360k objects,
    alive as long as the process) out of the cyclic collector's sight, so that a full collection
    scans only what requests created since. Unfrozen, each full collection paused the event loop for
    up to ~200 ms: bench/proxy.py at 16 streams had a p99 of 180-290 ms per word, 30-37 ms frozen.
    Registered by ``serve`` after the services (a process-wide setting: not for in-process tests)."""
    gc.collect()
    gc.freeze()
    log.info("froze %d startup objects out of the garbage collector's scans", gc.get_freeze_count())


async def _begin_drain(app: web.Application) -> None:
    """Shutdown began (no new connections): streams in flight may finish within the grace period;
    those still running just before it ends are ended cleanly by their exchanges."""
    services = app.get(SERVICES)
    if services is None or services.stopping is None:
        return
    grace = app[SETTINGS].server.shutdown_grace_s
    fut = services.stopping
    log.info("shutting down: streams in flight have %.1fs to finish", grace)

    def stop() -> None:
        if not fut.done():
            fut.set_result(None)

    asyncio.get_running_loop().call_later(max(0.0, grace - min(0.5, grace / 4)), stop)


async def _watch_config(app: web.Application) -> AsyncIterator[None]:
    reloader = app[RELOADER]
    reloader.install_sighup(asyncio.get_running_loop())
    task = asyncio.create_task(reloader.watch(), name="guardproxy-config-watch")
    try:
        yield
    finally:
        await cancel_and_wait(task)


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
