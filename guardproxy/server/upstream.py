"""The client to the upstream LLM server: a pooled aiohttp session, fixed base URL, header hygiene,
and retries (tenacity) for connection errors and 429/502/503/504 - only before anything has reached
the client, since a retried stream would repeat text the client already has."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from guardproxy.apis.errors import bad_upstream
from guardproxy.apis.registry import api_for
from guardproxy.config import UpstreamSettings
from guardproxy.observe.logs import request_id

# Never forwarded: hop-by-hop headers (RFC 9110 7.6.1), and what the proxy sets itself.
_DROP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Accept-Encoding",
        "Content-Encoding",
        "Cookie",
        "X-Forwarded-For",
        "Forwarded",
        # A WebSocket handshake's (the Responses WebSocket mode): the upstream is asked over HTTP.
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
    )
)
_SET_HERE = frozenset({"x-request-id", "content-type"})  # set by headers() itself
_KEYS = frozenset({"authorization", "x-api-key"})  # the client's credentials
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# The upstream's response headers a client reads, handed back: its request id (what a bug report to the
# provider needs), rate limits and retry advice. Everything else is the proxy's own.
_RETURNED = ("request-id", "retry-after", "openai-processing-ms", "openai-version")
_RETURNED_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


def returned_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What of the upstream's response headers goes back to the client."""
    return {
        name: value
        for name, value in headers.items()
        if name.lower() in _RETURNED or name.lower().startswith(_RETURNED_PREFIXES)
    }


class _RetryStatus(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    # No total timeout: a stream may rightly last long. A read that stalls past read_timeout_s fails.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
    )
    connector = aiohttp.TCPConnector(limit=settings.max_connections)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=True)


def _keyed_by_x_api_key(path: str) -> bool:
    spec = api_for(path)
    return spec is not None and spec.key_header == "x-api-key"


class Upstream:
    def __init__(self, settings: UpstreamSettings, client: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.client = client
        self.base = settings.base_url.rstrip("/")

    def url(self, path: str) -> str:
        """``/v1/chat/completions`` -> ``{base_url}/chat/completions``: the base URL already ends in
        the API version, as an openai client's does. The request never chooses the host."""
        rest = path[3:] if path.startswith("/v1/") else path
        return self.base + rest

    def headers(
        self,
        incoming: Mapping[str, str],
        *,
        forward_auth: bool = True,
        json_body: bool = False,
        anthropic: bool = False,
    ) -> CIMultiDict[str]:
        """Every decision about what the upstream sees, in one place: the client's end-to-end
        headers (``anthropic-version`` and ``anthropic-beta`` among them), without hop-by-hop ones,
        without the client's key (``Authorization`` or ``x-api-key``) when guardproxy has keys of its
        own (``forward_auth`` False), with the upstream key when one is configured (as a bearer token,
        and as ``x-api-key`` for the Anthropic API), and our request id."""
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            low = name.lower()
            if low in _DROP or low in _SET_HERE or (low in _KEYS and not forward_auth):
                continue
            out.add(name, value)
        if self.settings.api_key is not None:
            out["Authorization"] = f"Bearer {self.settings.api_key}"
            if anthropic or "x-api-key" in out:
                out["x-api-key"] = self.settings.api_key
        out["Accept-Encoding"] = "identity"
        out["X-Request-Id"] = request_id.get()
        if json_body:
            out["Content-Type"] = "application/json"
        return out

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        forward_auth: bool = True,
    ) -> aiohttp.ClientResponse:
        """The upstream's response with its headers read (the body not yet). Retried while nothing
        has been sent to the client; the last retryable status is returned as it is. ``headers`` are
        the client's, as received (``headers()`` decides what goes on); a ``body`` is JSON."""
        attempts = self.settings.retries + 1
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception_type(
                (aiohttp.ClientConnectionError, asyncio.TimeoutError, _RetryStatus)
            ),
            reraise=True,
        )
        fwd = self.headers(
            headers,
            forward_auth=forward_auth,
            json_body=body is not None,
            anthropic=_keyed_by_x_api_key(path),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    resp = await self.client.request(method, self.url(path), headers=fwd, data=body)
                    last = attempt.retry_state.attempt_number >= attempts
                    if resp.status in RETRY_STATUSES and not last:
                        resp.release()
                        raise _RetryStatus(resp.status)
                    return resp
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise bad_upstream(
                f"upstream unreachable: {type(exc).__name__}: {exc}", code="upstream_unreachable"
            ) from None
        raise AssertionError("unreachable")  # tenacity either returned or raised
