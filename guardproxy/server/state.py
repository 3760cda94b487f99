"""The application's shared state: its typed keys (aiohttp ``AppKey``/``RequestKey``), and reading a
request's JSON body, for every module that serves routes (``app.py``, ``ui.py``)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from guardproxy.apis.errors import bad_request
from guardproxy.config import Settings
from guardproxy.observe.metrics import Metrics
from guardproxy.server.exchange import GuardServices
from guardproxy.server.reload import ConfigReloader, SettingsStore

SETTINGS = web.AppKey("settings", Settings)  # as started; the policy part is read from LIVE_SETTINGS
LIVE_SETTINGS = web.AppKey("live_settings", SettingsStore)  # reloaded from the file as it changes
METRICS = web.AppKey("metrics", Metrics)
SERVICES = web.AppKey("services", GuardServices)
GUARD_NAME = web.AppKey("guard_name", str)
REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_KEY = web.RequestKey("client_key", str)  # the hashed bearer key, for per-key policies
RELOADER = web.AppKey("reloader", ConfigReloader)
ENGINE_SOCKET = web.AppKey("engine_socket", str)  # set in a proxy worker of a shared guard engine
WORKER = web.AppKey("worker", int)  # that worker's number


async def json_body(request: web.Request) -> dict[str, Any]:
    return parse_body(await request.read())


def parse_body(raw: bytes | str) -> dict[str, Any]:
    """A request's JSON object (a body, or a WebSocket frame), or a 400 naming what is wrong."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("request body is not UTF-8") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body
