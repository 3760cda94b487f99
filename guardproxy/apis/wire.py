"""What every API's wire format provides to the exchange (one subclass per API, one instance per request).

A wire format owns, for its API only: reading a request into the conversation the guard reads (chat
messages and tools, what ``ChatTemplate`` takes) and the body to send upstream; reading the upstream's
events (or its whole answer) into the core's ``Event``s; writing what the core releases (text, markers,
the finish, the cut) as the events or the body its clients expect; a blocked prompt; and its error
shape, before and after a stream has started. No I/O here: the exchange does that.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from guardproxy.apis.errors import Api, ProxyError, bad_request, bad_upstream
from guardproxy.apis.responses_store import ResponseStore
from guardproxy.guard.template import ConversationError
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import tool_field
from guardproxy.stream.moderator import Out
from guardproxy.stream.outputs import Event, Marker, Outputs, ToolArgs, ToolEnd
from guardproxy.stream.sse import SSEEvent

Details = Callable[
    [], dict[str, Any]
]  # the request's moderation details, built when a final event is written


@dataclass(frozen=True)
class Conversation:
    """What the guard reads of a request: chat-shaped messages and tool definitions."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


def joined_text(
    value: Any, where: str, param: str, what: str, read: Callable[[Mapping[str, Any], str], str | None]
) -> str:
    """Content given as a string, or as a list of objects (``what``) each read by ``read`` (None:
    nothing to read there), joined by newlines; ``param`` names the request field in errors. The one
    walk both request readers (Messages blocks, Responses parts) share."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ConversationError(f"{where} must be a string or a list of {what}", param=param)
    texts = []
    for k, part in enumerate(value):
        if not isinstance(part, Mapping):
            raise ConversationError(f"{where}[{k}] must be an object", param=param)
        text = read(part, f"{where}[{k}]")
        if text is not None:
            texts.append(text)
    return "\n".join(texts)


def parse_json(data: str | bytes, what: str) -> dict[str, Any]:
    """An upstream's JSON object, or a 502 naming what was malformed. orjson reads every upstream
    event (bench/json_codec.py: 7.6 -> 1.2 us to read and write an event of a real stream); what it refuses
    and the stdlib reads (NaN, Infinity, integers past 64 bits, lone surrogates) still goes through."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(data)
        except ValueError:
            raise bad_upstream(f"upstream sent {what} that is not JSON") from None
    if not isinstance(value, dict):
        raise bad_upstream(f"upstream sent {what} that is not a JSON object")
    return value


# Keys whose strings are never model-written text: names of the protocol, ids, states, and opaque or
# binary payloads (encrypted reasoning, signatures, base64 images) that the text guard cannot read.
NO_TEXT_KEYS = frozenset(
    {
        "type",
        "id",
        "item_id",
        "call_id",
        "tool_use_id",
        "object",
        "status",
        "role",
        "model",
        "created_at",
        "sequence_number",
        "output_index",
        "content_index",
        "summary_index",
        "index",
        "encrypted_content",
        "signature",
        "partial_image_b64",
        "data",  # base64 payloads: audio, images, redacted thinking
        "image_url",  # a screenshot or picture: a URL, or the image itself as a data URL
        "file_data",
        "file_url",
        "result",  # image_generation_call: the image, base64
        "approval_request_id",
        "server_label",
        "stop_reason",
        "stop_sequence",
        "finish_reason",
        "logprobs",
    }
)


def carried_text(value: Any) -> Any:
    """What of ``value`` may be model-written text: a copy keeping only the string leaves outside
    ``NO_TEXT_KEYS`` (and the objects and lists that hold them), or None when there is none."""
    if isinstance(value, str):
        # A data URL is a file's bytes (an image, a PDF), never text the model wrote.
        return value if value and not value.startswith("data:") else None
    if isinstance(value, Mapping):
        kept = {k: v for k, v in ((k, carried_text(v)) for k, v in value.items() if k not in NO_TEXT_KEYS)}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    if isinstance(value, list):
        items = [v for v in (carried_text(v) for v in value) if v is not None]
        return items or None
    return None


def without_text(value: Any) -> Any:
    """``value`` with every string ``carried_text`` would keep emptied: the same shape, no text."""
    if isinstance(value, str):
        return "" if carried_text(value) is not None else value
    if isinstance(value, Mapping):
        return {k: v if k in NO_TEXT_KEYS else without_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_text(v) for v in value]
    return value


def stripped(events: list[Event], original: Any) -> Any:
    """What ``Wire.opaque`` made of ``original`` when the policy dropped its text: the payload to send
    in its place (None when it was judged, or carried no text)."""
    if len(events) == 1 and isinstance(events[0], Marker) and events[0].payload != original:
        return events[0].payload
    return None


def dumps(value: Any) -> str:
    """JSON as the guard reads it (tool arguments given as objects, non-text payloads): the stdlib's
    spacing, which is what Qwen3's chat template (``tojson``) gives the model for the same object."""
    return json.dumps(value, ensure_ascii=False)


def event_json(value: Any) -> str:
    """An event or body for the client: compact UTF-8 JSON by orjson (bench/json_codec.py: with the
    read, 7.6 -> 1.2 us an event of a real stream), the stdlib for what orjson refuses (integers past
    64 bits, lone surrogates). A NaN or infinity read from an upstream goes out as null: JSON has no
    such number and a client's parser would refuse it."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def tool_list(tools: Any, function: Callable[[Any], dict[str, Any] | None]) -> list[dict[str, Any]] | None:
    """An API's tool definitions in the chat shape the guard's template reads: ``function`` gives a
    tool's chat ``function`` object, or None for a tool kept as it is (built-in and server tools)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of tool objects", param="tools")
    out = []
    for t in tools:
        fn = function(t)
        out.append(t if fn is None else {"type": "function", "function": fn})
    return out


def optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{key} must be a string", param=key)
    return value


class EventWriter(ABC):
    """An API whose outputs go out as named stream events, one method a kind of moderated event."""

    def write(self, out: Out, details: Details) -> bytes:
        if out.kind == "text":
            assert out.field is not None
            return self._text(out.field, out.text)
        if out.kind == "marker":
            return self._marker(dict(out.payload))
        if out.kind == "finish":
            return self._finish(out.payload, details)
        return self._cut(out.text, details)

    @abstractmethod
    def _text(self, name: str, text: str) -> bytes: ...

    @abstractmethod
    def _marker(self, ev: dict[str, Any]) -> bytes: ...

    @abstractmethod
    def _finish(self, payload: Any, details: Details) -> bytes: ...

    @abstractmethod
    def _cut(self, notice: str, details: Details) -> bytes: ...


class Wire(ABC):
    api: Api = "openai"
    route: str
    conversation_param: str = "messages"  # the request parameter a bad conversation is blamed on

    def __init__(self, body: dict[str, Any], policy: Policy) -> None:
        self.body = body
        self.policy = policy
        self.model = optional_str(body, "model")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise bad_request("stream must be a boolean", param="stream")
        self.streaming = bool(stream)
        self.max_outputs = 1
        self.silent: set[str] = set()  # fields of calls that stand for events read whole (``opaque``)

    # -- request -----------------------------------------------------------------------------------

    @abstractmethod
    def conversation(self) -> Conversation:
        """The conversation the guard reads (raises ``ConversationError`` or ``ProxyError``)."""

    def upstream_body(self) -> bytes:
        return event_json(self.body).encode()

    def prompt_text(self) -> str:
        """The prompt as text, for an audit record that keeps text."""
        conv = self.conversation()
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in conv.messages)

    # -- upstream ----------------------------------------------------------------------------------

    def opaque(self, output: int, call: int, kind: str, payload: Any) -> list[Event]:
        """An upstream event (or an output item) of a kind this wire does not read. Without text it is
        a marker. With text, ``policy.unknown_events`` decides: ``judge`` reads the text as tool call
        ``call`` named ``kind`` (its JSON as the arguments) and releases the event whole once that is
        judged (dropped with it on a cut); ``drop`` passes the event with its text emptied; ``fail``
        ends the response."""
        text = carried_text(payload)
        if text is None:
            return [Marker(output, payload)]
        rule = self.policy.unknown_events
        if rule == "drop":
            # Its text is left out, not the event: clients track items and blocks by their events.
            return [Marker(output, without_text(payload))]
        if rule == "fail":
            raise bad_upstream(
                f"upstream sent {kind}, which carries text guardproxy does not know how to read "
                "(policy.unknown_events: fail)",
                code="unknown_event",
            )
        self.silent.add(tool_field(call))
        return [
            ToolArgs(output, call, kind, text if isinstance(text, str) else dumps(text)),
            ToolEnd(output, call),
            Marker(output, payload, call=call),
        ]

    @abstractmethod
    def read_event(self, event: SSEEvent) -> list[Event]:
        """One upstream event in; sets ``upstream_done`` on the upstream's last one."""

    upstream_done = False

    @abstractmethod
    def read_whole(self, raw: bytes) -> list[Event]:
        """An answer that is not streamed: its whole body in."""

    # -- client ------------------------------------------------------------------------------------

    def annotate(self, target: dict[str, Any], details: Details) -> None:
        """guardproxy's verdict details on a body or event, where the policy asks for them."""
        if self.policy.details:
            target["guardproxy"] = details()

    def remember(self, store: ResponseStore, outputs: Outputs) -> None:
        """Keep what a later request may continue from (the Responses API's turns); others keep nothing."""
        return

    def render(self, output: int, out: Out, details: Details) -> bytes:
        """Released text, a marker, the finish or the cut of one output, as this API's events."""
        if out.kind == "text" and out.field in self.silent:
            return b""  # an opaque field's or event's text: it goes out whole, as a marker
        return self._render(output, out, details)

    @abstractmethod
    def _render(self, output: int, out: Out, details: Details) -> bytes:
        """``render`` for all but the text of opaque fields."""

    def tail(self) -> bytes:
        """What goes out after every output ended (chat: usage chunks, then ``[DONE]``)."""
        return b""

    @abstractmethod
    def whole(self, outputs: Outputs, details: Details) -> dict[str, Any]:
        """The answer that is not streamed, as released."""

    @abstractmethod
    def blocked(self, verdict: Verdict, details: Details) -> list[bytes] | dict[str, Any]:
        """A prompt blocked with ``blocked_prompt: refusal``: the events of a stream, or the body."""

    @abstractmethod
    def error_event(self, exc: ProxyError) -> bytes:
        """An error once the stream has started: the last thing written."""
