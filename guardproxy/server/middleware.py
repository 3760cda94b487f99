"""What every request goes through before its route: a request id (the client's when sane) and one
access-log line; the client's key hashed, and checked when guardproxy has keys of its own; every error
answered in the shape of the API the path belongs to (``apis/registry.py``), whatever raised it."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from guardproxy.apis.errors import Api, ProxyError
from guardproxy.apis.registry import shape_for
from guardproxy.config import key_hash
from guardproxy.observe.logs import request_id
from guardproxy.server.state import CLIENT_KEY, LIVE_SETTINGS, METRICS, REQUEST_ID, WORKER

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
access_log = logging.getLogger("guardproxy.access")


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Take the client's ``x-request-id`` (when it is sane) or make one; it tags the logs, the audit
    record, the upstream request and the response. One access-log line per request, never headers."""
    given = request.headers.get("x-request-id", "")
    rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = rid  # responses are often prepared after this middleware has returned
    token = request_id.set(rid)
    started = time.perf_counter()
    status = 499
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        access_log.info(
            "%s %s %d %.1fms", request.method, request.path, status, (time.perf_counter() - started) * 1000
        )
        request_id.reset(token)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-request-id"] = request.get(REQUEST_ID) or request_id.get()
    if WORKER in request.app:  # which of several proxy workers answered (the access log has its pid)
        response.headers["x-guardproxy-worker"] = str(request.app[WORKER])


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    response = await _handle(request, handler)
    request.app[METRICS].requests.labels(route, str(response.status)).inc()
    return response


async def _handle(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    api = shape_for(request.path)
    try:
        _authenticate(request)
        return await handler(request)
    except ProxyError as exc:
        return _error_response(exc, api)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"Invalid URL ({request.method} {request.path})",
            405: f"Method {request.method} not allowed on {request.path}",
            413: "Request body too large",
        }.get(exc.status, exc.reason)
        return _error_response(ProxyError(exc.status, message), api)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(ProxyError(500, "internal error in guardproxy", type="server_error"), api)


def _error_response(exc: ProxyError, api: Api) -> web.Response:
    return web.json_response(exc.body(api), status=exc.status, headers=exc.headers)


def _authenticate(request: web.Request) -> None:
    """Hash the client's key (a bearer token, or Anthropic's ``x-api-key``) for per-key policies and,
    when guardproxy has keys of its own, refuse requests without one of them: on the API and on the
    data the ``/ui`` page reads (the page's shell holds none). Health and metrics stay open for probes
    and scrapers."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "").strip()
    if key:
        request[CLIENT_KEY] = key_hash(key)
    keys = request.app[LIVE_SETTINGS].current.auth.api_keys_sha256
    guarded = request.path.startswith(("/v1/", "/ui/api/"))
    if keys and guarded and request.get(CLIENT_KEY) not in keys:
        raise ProxyError(
            401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


def forward_client_key(request: web.Request) -> bool:
    """The client's key goes upstream only when guardproxy has no keys of its own."""
    return not request.app[LIVE_SETTINGS].current.auth.api_keys_sha256
