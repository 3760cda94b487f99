"""One error type for every failure a client can see, rendered in the shape of the API it came on:
OpenAI's (`{"error": {"message", "type", "param", "code"}}`, chat, completions, responses, moderations)
or Anthropic's (`{"type": "error", "error": {"type", "message"}}`, messages). Once a stream has started,
each API module renders it as its own error event. Sans-IO: the server turns it into an HTTP response."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from guardproxy.guard.errors import EngineError, EngineOverloaded, EngineUnavailable, PromptTooLong

Api = Literal["openai", "anthropic"]

# Anthropic's error types by status (its API reference); other 5xx: api_error, 4xx: invalid_request_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


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
        self._body = body  # an upstream's own error body, relayed as it is when in the right shape

    def body(self, api: Api = "openai") -> dict[str, Any]:
        if api == "anthropic":
            if self._body is not None and self._body.get("type") == "error":
                return self._body
            kind = _ANTHROPIC_TYPES.get(
                self.status, "api_error" if self.status >= 500 else "invalid_request_error"
            )
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        if self._body is not None and isinstance(self._body.get("error"), dict) and "type" not in self._body:
            return self._body
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def engine_error(exc: EngineError) -> ProxyError:
    """What a client is told when the guard engine cannot take or finish its request (every API)."""
    if isinstance(exc, EngineOverloaded):  # come back later: when, in whole seconds
        retry = {"Retry-After": str(int(exc.retry_after + 0.999))}
        if isinstance(exc, EngineUnavailable):  # a shared engine starting or restarting
            return ProxyError(
                503,
                f"the guard is not available: {exc}",
                type="server_error",
                code="guard_unavailable",
                headers=retry,
            )
        return ProxyError(
            429,
            f"guard is at capacity: {exc}",
            type="rate_limit_error",
            code="guard_overloaded",
            headers=retry,
        )
    if isinstance(exc, PromptTooLong):
        return ProxyError(400, str(exc), code="context_length_exceeded")
    return guard_failed(str(exc))


def prompt_blocked(message: str, param: str, headers: Mapping[str, str]) -> ProxyError:
    """A prompt the policy blocks, answered as an error (``blocked_prompt: error``)."""
    return ProxyError(400, message, param=param, code="content_filter", headers=headers)


def guard_failed(reason: str) -> ProxyError:
    return ProxyError(
        503, f"the guard could not judge this request: {reason}", type="server_error", code="guard_error"
    )


def bad_upstream(message: str, code: str | None = None) -> ProxyError:
    """The upstream failed or broke its API's protocol (unreachable, an error event, malformed,
    truncated, out of order): a 502 the client gets in its own API's error shape."""
    return ProxyError(502, message, type="upstream_error", code=code)


def upstream_event_error(err: Mapping[str, Any], default_type: str = "upstream_error") -> ProxyError:
    """An error event the upstream sent after the stream began (each API has its own): a 502 with its
    message, its type (else ``default_type``) and code, which the client gets as its API's error event."""
    return ProxyError(
        502,
        str(err.get("message") or "upstream error"),
        type=str(err.get("type") or default_type),
        code=err.get("code"),
    )


def upstream_error(status: int, raw: bytes) -> ProxyError:
    """An upstream's error response, relayed with its status. Its body is kept when it is an error of
    either API's shape (each route renders its own); anything else is wrapped, so a client always gets
    its API's error shape."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]:
        err = body["error"]
        message = str(err.get("message"))
        if body.get("type") == "error":  # Anthropic's shape
            return ProxyError(status, message, type=str(err.get("type") or "api_error"), body=body)
        openai_body = {
            "error": {
                "message": message,
                "type": err.get("type") or "upstream_error",
                "param": err.get("param"),
                "code": err.get("code"),
            }
        }
        return ProxyError(status, message, type=str(openai_body["error"]["type"]), body=openai_body)
    text = raw.decode("utf-8", "replace").strip()[:500]
    return ProxyError(
        status, f"upstream returned HTTP {status}" + (f": {text}" if text else ""), type="upstream_error"
    )
