"""The Responses API's WebSocket mode: ``GET /v1/responses`` upgraded to a WebSocket, on which a client
sends ``{"type": "response.create", ...}`` frames (the body of a ``POST /v1/responses``, always
streamed) and gets each response's events back as JSON text frames, one response after another on one
connection. Codex's built-in provider and the OpenAI Agents SDK's ``OpenAIResponsesWSModel`` speak it.

Each ``response.create`` is one moderated request, exactly as over HTTP: the same wire format, prompt
verdict, engine, release rule, cut (``response.incomplete``), store for ``previous_response_id``,
metrics and audit; the upstream is asked over HTTP (``stream: true``), so any Responses server works
behind it. Only the transport differs: the exchange writes its events to a ``FrameSink`` instead of an
SSE body. An error before a response starts (a bad frame, a blocked prompt, a full guard) is an
``error`` frame in the shape OpenAI's WebSocket mode uses, and the connection stays open for the next.
A plain ``GET`` without the upgrade gets 426, which sends clients that try the mode first to HTTP.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from guardproxy.apis.errors import ProxyError, bad_request
from guardproxy.server.state import parse_body
from guardproxy.stream.sse import SSEDecoder

log = logging.getLogger(__name__)

# One moderated Responses request, its events written to the sink.
Moderate = Callable[[dict[str, Any], "FrameSink"], Awaitable[object]]


class FrameSink:
    """Written like an SSE response by the exchange: each event's data goes out as one text frame."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self._decoder = SSEDecoder()

    async def write(self, data: bytes) -> None:
        for event in self._decoder.feed(data):
            if event.data.strip() != "[DONE]":
                await self.ws.send_str(event.data)

    async def write_eof(self) -> None:
        for event in self._decoder.flush():
            await self.ws.send_str(event.data)


def error_frame(exc: ProxyError) -> str:
    return json.dumps({"type": "error", "status": exc.status, "error": exc.body()["error"]})


async def serve_responses(request: web.Request, moderate: Moderate, max_frame: int) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ProxyError(
            426,
            "GET /v1/responses is the Responses API's WebSocket mode: connect with an Upgrade: websocket "
            "handshake, or use POST /v1/responses over HTTP.",
            code="upgrade_required",
            headers={"Upgrade": "websocket"},
        )
    ws = web.WebSocketResponse(max_msg_size=max_frame, heartbeat=30.0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_str(error_frame(bad_request("frames must be JSON text frames")))
            continue
        try:
            body = parse_body(msg.data)
            if body.pop("type", None) != "response.create":
                raise bad_request("each frame must be a response.create request", param="type")
            body["stream"] = True  # the WebSocket mode always streams
            await moderate(body, FrameSink(ws))
        except ProxyError as exc:
            await ws.send_str(error_frame(exc))
        except ConnectionError:  # the client went away mid-response: its exchange is cleaned up
            break
        except Exception:
            log.exception("unhandled error on a Responses WebSocket")
            await ws.send_str(
                error_frame(ProxyError(500, "internal error in guardproxy", type="server_error"))
            )
    return ws
