"""One error type, two renderings: an OpenAI-shaped JSON body, or (once a stream has started) an SSE
error event followed by ``[DONE]``. Every failure a client can see goes through here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from guardproxy.stream.sse import DONE, encode_event


class ProxyError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self._body = body  # an upstream's own OpenAI-shaped body, relayed as it is

    def body(self) -> dict[str, Any]:
        if self._body is not None:
            return self._body
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def sse(self) -> bytes:
        return encode_event(json.dumps(self.body(), ensure_ascii=False)) + DONE


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def upstream_error(status: int, raw: bytes) -> ProxyError:
    """An upstream's error response, relayed with its status; a body that is not OpenAI-shaped is
    wrapped so the client always gets one error shape."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]:
        err = body["error"]
        body = {
            "error": {
                "message": str(err.get("message")),
                "type": err.get("type") or "upstream_error",
                "param": err.get("param"),
                "code": err.get("code"),
            }
        }
        return ProxyError(status, body["error"]["message"], body=body)
    text = raw.decode("utf-8", "replace").strip()[:500]
    return ProxyError(
        status, f"upstream returned HTTP {status}" + (f": {text}" if text else ""), type="upstream_error"
    )
