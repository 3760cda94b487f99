"""The aiohttp application: typed app keys, long-lived resources in ``cleanup_ctx``, the routes
(``routes.py``) and the middleware (``middleware.py``) put together. Every error leaves in the shape of
the route's API (``apis/errors.py``: Anthropic's on ``/v1/messages``, OpenAI's elsewhere). guardproxy
is not an open proxy: the upstream comes from the configuration, never from the request, and paths it
does not serve are 404. Among those, on purpose: routes that hand back stored upstream text unjudged
(``GET /v1/responses/{id}`` and its ``input_items``, the polling and stream resume of background
responses, ``/v1/messages/batches``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from guardproxy.aio import cancel_and_wait
from guardproxy.apis import moderations as moderation
from guardproxy.apis.registry import APIS
from guardproxy.apis.responses_store import ResponseStore
from guardproxy.config import Settings
from guardproxy.guard.api import Engine
from guardproxy.guard.checkpoint import load_template
from guardproxy.guard.remote import RemoteEngine
from guardproxy.guard.template import ChatTemplate
from guardproxy.observe.audit import AuditLog
from guardproxy.observe.live import LiveFeed
from guardproxy.observe.metrics import Metrics
from guardproxy.server import ui
from guardproxy.server.exchange import GuardServices
from guardproxy.server.middleware import (
    add_request_id,
    error_middleware,
    request_id_middleware,
)
from guardproxy.server.reload import ConfigReloader, SettingsStore
from guardproxy.server.routes import (
    HANDLERS,
    count_tokens,
    healthz,
    metrics,
    models,
    moderations,
    readyz,
    responses_websocket,
)
from guardproxy.server.state import (
    ENGINE_SOCKET,
    GUARD_NAME,
    LIVE_SETTINGS,
    METRICS,
    RELOADER,
    SERVICES,
    SETTINGS,
    WORKER,
)
from guardproxy.server.upstream import Upstream, session

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
