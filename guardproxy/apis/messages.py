"""The Anthropic Messages API (``POST /v1/messages``): one output per message.

Request -> guard: ``messages_request.py`` (system, messages and their blocks, tools).

Upstream events -> core: ``text_delta`` is content, ``thinking_delta`` reasoning, ``input_json_delta``
a tool call's arguments (``tool_use``, ``server_tool_use``, ``mcp_tool_use`` blocks, each held with its
start and stop and released whole); ``message_start``, ``ping``, ``content_block_start``/``stop`` of
text and thinking, ``signature_delta`` carry no text and pass in order; a block of any other kind (a
server tool's result, one this wire does not know), its deltas, ``citations_delta`` and unknown events
are read by ``Wire.opaque``. ``message_delta`` (the stop reason) is held and goes out with
``message_stop``, the finish.

Core -> client: text becomes ``content_block_delta`` events of its block. A cut: the released text,
``content_block_stop`` for the open block, ``message_delta`` with ``stop_reason: "refusal"`` and
``stop_details`` (what Anthropic's API itself sends when its classifiers stop a stream), then
``message_stop``. Errors are Anthropic-shaped, the ``error`` event once the stream has started.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from guardproxy.apis.errors import ProxyError, bad_request, bad_upstream, upstream_event_error
from guardproxy.apis.messages_request import CALL_BLOCKS, NO_TEXT_BLOCKS, chat_messages, chat_tools
from guardproxy.apis.wire import (
    Conversation,
    Details,
    EventWriter,
    Wire,
    dumps,
    event_json,
    parse_json,
    stripped,
)
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, REASONING, tool_call_of, tool_field
from guardproxy.stream.moderator import Out
from guardproxy.stream.outputs import Event, Finish, Marker, Outputs, Text, ToolArgs, ToolEnd
from guardproxy.stream.sse import SSEEvent, encode_event

REFUSAL = "refusal"
_TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


class MessagesWire(Wire, EventWriter):
    api = "anthropic"
    route = "/v1/messages"

    def __init__(self, body: dict[str, Any], policy: Policy) -> None:
        super().__init__(body, policy)
        if "messages" not in body:
            raise bad_request("messages: field required", param="messages")
        self._block_calls: dict[int, int] = {}  # upstream block index -> the tool call it holds
        self._opaque_blocks: dict[int, int] = {}  # block read whole -> the call judging its start
        self._names: dict[int, str | None] = {}  # tool call -> name
        self._calls = 0  # tool calls so far (opaque blocks and events count as calls of their own)
        self._message_delta: dict[str, Any] | None = None
        self._deltas = 0  # upstream content deltas read (about one a token): the usage of a cut answer
        # Writing to the client.
        self._open: dict[int, str] = {}  # blocks started and not stopped: index -> type
        self._field_block: dict[str, int] = {}  # the block each field's text goes to
        self._next_block = 0
        self._snapshot: dict[str, Any] = {}
        self._original: dict[str, Any] | None = None
        self._whole_map: list[tuple[int, str, int, int]] = []  # (block, field, start, end)
        self._whole_replaced: dict[int, Any] = {}  # blocks with their text dropped (unknown_events: drop)

    def conversation(self) -> Conversation:
        return Conversation(
            chat_messages(self.body.get("system"), self.body.get("messages")),
            chat_tools(self.body.get("tools")),
        )

    # -- upstream ----------------------------------------------------------------------------------

    def read_event(self, event: SSEEvent) -> list[Event]:
        ev = parse_json(event.data, "an event")
        kind = str(ev.get("type") or event.event)
        if kind == "error":
            raise upstream_event_error(
                ev["error"] if isinstance(ev.get("error"), Mapping) else {}, "api_error"
            )
        if kind == "message_delta":
            self._message_delta = ev  # goes out with message_stop, the end of the message
            return []
        if kind == "message_stop":
            self.upstream_done = True
            reason = (self._message_delta or {}).get("delta", {}).get("stop_reason")
            return [Finish(0, reason, (self._message_delta, ev))]
        if kind == "message_start":
            message = ev.get("message")
            if isinstance(message, Mapping) and message.get("content"):
                # Content comes in blocks, judged; none is taken from the opening snapshot.
                ev = {**ev, "message": {**message, "content": []}}
            return [Marker(0, ev)]
        if kind == "ping":
            return [Marker(0, ev)]
        if kind == "content_block_stop":
            index = _block_index(ev)
            call = self._block_calls.get(index)
            if call is not None:
                return [ToolEnd(0, call), Marker(0, ev, call=call)]
            return [Marker(0, ev, call=self._opaque_blocks.get(index))]  # goes with its block's start
        if kind == "content_block_start":
            return self._block_start(ev)
        if kind == "content_block_delta":
            delta = ev.get("delta")
            if not isinstance(delta, Mapping):
                raise bad_upstream("upstream sent a content_block_delta without a delta")
            dtype = str(delta.get("type"))
            index = _block_index(ev)
            if dtype in _TEXT_DELTAS:
                self._deltas += 1
                key = _TEXT_DELTAS[dtype]
                text = delta.get(key)
                if not isinstance(text, str):
                    raise bad_upstream(f"upstream sent a {dtype} without {key}")
                if dtype == "text_delta":
                    return [Text(0, CONTENT, text)]
                if dtype == "thinking_delta":
                    return [Text(0, REASONING, text)]
                call = self._block_calls.get(index)
                if call is None:
                    raise bad_upstream("upstream sent tool input outside a tool_use block")
                return [ToolArgs(0, call, self._names.get(call), text)]
            if dtype == "signature_delta":
                return [Marker(0, ev)]  # the thinking block's signature: no text
            call = self._block_calls.get(index)
            if call is not None:  # any other delta of a tool call's block goes out with the call
                return [Marker(0, ev, call=call)]
            # citations_delta (a quote from a source), a delta of a block read whole, a kind this wire
            # does not know: each judged whole (it carries text the block's start did not).
            return self.opaque(0, self._new_call(), dtype, ev)
        return self.opaque(0, self._new_call(), kind, ev)

    def _new_call(self) -> int:
        call = self._calls
        self._calls += 1
        return call

    def _block_start(self, ev: dict[str, Any]) -> list[Event]:
        block = ev.get("content_block")
        if not isinstance(block, Mapping) or not isinstance(ev.get("index"), int):
            raise bad_upstream("upstream sent a malformed content_block_start")
        index, btype = ev["index"], str(block.get("type"))
        if btype in CALL_BLOCKS:
            call = self._new_call()
            self._names[call] = block.get("name")
            self._block_calls[index] = call
            out: list[Event] = [Marker(0, {**ev, "content_block": {**block, "input": {}}}, call=call)]
            if block.get("input"):  # input given with the start: judged as any other
                out.append(ToolArgs(0, call, block.get("name"), dumps(block["input"])))
            return out
        if btype in ("text", "thinking"):
            key, name = ("text", CONTENT) if btype == "text" else ("thinking", REASONING)
            first = block.get(key)
            if first:  # text that comes with the block's start is judged as any other (rare, allowed)
                return [Marker(0, {**ev, "content_block": {**block, key: ""}}), Text(0, name, str(first))]
            return [Marker(0, ev)]
        if btype in NO_TEXT_BLOCKS:
            return [Marker(0, ev)]
        # A server tool's result (web search, code execution...) or a block this wire does not know:
        # its text is judged whole; its stop goes out with it, its deltas are judged each.
        call = self._new_call()
        events = self.opaque(0, call, btype, ev)
        if any(isinstance(e, ToolArgs) for e in events):
            self._opaque_blocks[index] = call
        return events

    def read_whole(self, raw: bytes) -> list[Event]:
        body = parse_json(raw, "a message")
        if not isinstance(body.get("content"), list):
            raise bad_upstream("upstream message has no content")
        self._original = body
        out: list[Event] = []
        lengths: dict[str, int] = {}
        for i, block in enumerate(body["content"]):
            if not isinstance(block, Mapping):
                raise bad_upstream("upstream sent a content block that is not an object")
            btype = str(block.get("type"))
            if btype in ("text", "thinking"):
                name, key = (CONTENT, "text") if btype == "text" else (REASONING, "thinking")
                text = block.get(key)
                if isinstance(text, str):
                    start = lengths.get(name, 0)
                    lengths[name] = start + len(text)
                    self._whole_map.append((i, name, start, start + len(text)))
                    out.append(Text(0, name, text))
                continue
            if btype in NO_TEXT_BLOCKS:
                continue
            call = self._new_call()
            if btype in CALL_BLOCKS:
                args = dumps(block.get("input") or {})
                read: list[Event] = [ToolArgs(0, call, block.get("name"), args), ToolEnd(0, call)]
            else:  # a server tool's result, or a block this wire does not know: read whole
                events = self.opaque(0, call, btype, block)
                if (emptied := stripped(events, block)) is not None:
                    self._whole_replaced[i] = emptied
                read = [e for e in events if not isinstance(e, Marker)]
            arguments = next((e.text for e in read if isinstance(e, ToolArgs)), None)
            if arguments is not None:
                self._whole_map.append((i, tool_field(call), 0, len(arguments)))
            out += read
        out.append(Finish(0, body.get("stop_reason")))
        return out

    # -- client: streamed ----------------------------------------------------------------------------

    @staticmethod
    def _emit(ev: dict[str, Any]) -> bytes:
        return encode_event(event_json(ev), event=str(ev["type"]))

    def _render(self, output: int, out: Out, details: Details) -> bytes:
        return self.write(out, details)

    def _marker(self, ev: dict[str, Any]) -> bytes:
        kind = ev.get("type")
        if kind == "message_start":
            self._snapshot = dict(ev.get("message") or {})
        elif kind == "content_block_start":
            index = int(ev["index"])
            btype = str((ev.get("content_block") or {}).get("type"))
            self._open[index] = btype
            self._next_block = max(self._next_block, index + 1)
            field = {"text": CONTENT, "thinking": REASONING}.get(btype)
            if field is None and index in self._block_calls:
                field = tool_field(self._block_calls[index])
            if field is not None:
                self._field_block[field] = index
        elif kind == "content_block_stop":
            self._open.pop(_block_index(ev), None)
        return self._emit(ev)

    def _text(self, name: str, text: str) -> bytes:
        pre = b""
        index = self._field_block.get(name)
        if index is None or index not in self._open:
            if name != CONTENT:
                raise bad_upstream("upstream sent content outside a content block")
            # Text the upstream never opened a block for: open one.
            index = self._next_block
            pre = self._marker(
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            )
        if name == CONTENT:
            delta = {"type": "text_delta", "text": text}
        elif name == REASONING:
            delta = {"type": "thinking_delta", "thinking": text}
        else:
            delta = {"type": "input_json_delta", "partial_json": text}
        return pre + self._emit({"type": "content_block_delta", "index": index, "delta": delta})

    def _finish(self, payload: Any, details: Details) -> bytes:
        if not isinstance(payload, tuple):  # the upstream stopped without message_stop
            return self.error_event(bad_upstream("upstream ended the message before message_stop"))
        delta, stop = payload
        delta = dict(
            delta
            or {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": self._deltas},
            }
        )
        self.annotate(delta, details)
        return self._emit(delta) + self._emit(dict(stop))

    def _cut(self, notice: str, details: Details) -> bytes:
        out: list[bytes] = []
        text_block = self._field_block.get(CONTENT)
        if notice and text_block is not None and text_block in self._open:
            out.append(self._text(CONTENT, notice))
        for index in sorted(self._open):
            out.append(self._emit({"type": "content_block_stop", "index": index}))
        self._open.clear()
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": REFUSAL, "stop_sequence": None, "stop_details": self._stop_details()},
            "usage": {"output_tokens": self._deltas},
        }
        self.annotate(delta, details)
        out.append(self._emit(delta))
        out.append(self._emit({"type": "message_stop"}))
        return b"".join(out)

    def _stop_details(self, text: str | None = None) -> dict[str, Any]:
        """Why the message stopped, as Anthropic's API says it for a refusal. Claude Code shows the
        ``explanation`` for the ``general_harms`` category (for none it prints only its generic
        usage-policy text); the guard's own category is in the details."""
        explanation = (text if text is not None else self.policy.notice).strip()
        return {
            "type": "refusal",
            "category": "general_harms",
            "explanation": explanation or "The response was stopped by guardproxy's content policy.",
        }

    def error_event(self, exc: ProxyError) -> bytes:
        return self._emit(exc.body("anthropic"))

    # -- client: whole -------------------------------------------------------------------------------

    def whole(self, outputs: Outputs, details: Details) -> dict[str, Any]:
        assert self._original is not None
        body = dict(self._original)
        m = outputs.answer(0)
        blocks = [dict(b) for b in body["content"]]
        keep = len(blocks)
        for i, name, start, end in self._whole_map:
            shown, full = m.shown(name, start, end), m.whole(name, start, end)
            if tool_call_of(name) is not None:
                if not full:
                    keep = min(keep, i)  # cut in its input: no tool call
                continue
            blocks[i]["text" if name == CONTENT else "thinking"] = shown
            if not full:
                keep = min(keep, i + 1)
        if outputs.cut:
            blocks = blocks[:keep]
            if self.policy.notice:
                texts = [b for b in blocks if b.get("type") == "text"]
                if texts:
                    texts[-1]["text"] += self.policy.notice
                else:
                    blocks.append({"type": "text", "text": self.policy.notice})
            body["stop_reason"] = REFUSAL
            body["stop_sequence"] = None
            body["stop_details"] = self._stop_details()
        body["content"] = [self._whole_replaced.get(i, b) for i, b in enumerate(blocks)]
        self.annotate(body, details)
        return body

    def blocked(self, verdict: Verdict, details: Details) -> list[bytes] | dict[str, Any]:
        text = self.policy.refusal
        message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": self.model or "",
            "content": [{"type": "text", "text": text}],
            "stop_reason": REFUSAL,
            "stop_sequence": None,
            "stop_details": self._stop_details(text),
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        if not self.streaming:
            self.annotate(message, details)
            return message
        start = {**message, "content": [], "stop_reason": None, "stop_details": None}
        end: dict[str, Any] = {
            "type": "message_delta",
            "delta": {
                "stop_reason": REFUSAL,
                "stop_sequence": None,
                "stop_details": self._stop_details(text),
            },
            "usage": {"output_tokens": 0},
        }
        self.annotate(end, details)
        return [
            self._emit({"type": "message_start", "message": start}),
            self._emit(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
            ),
            self._emit(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            ),
            self._emit({"type": "content_block_stop", "index": 0}),
            self._emit(end),
            self._emit({"type": "message_stop"}),
        ]


def _block_index(ev: Mapping[str, Any]) -> int:
    """The content block an event is about; an upstream event naming none is malformed."""
    index = ev.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise bad_upstream(f"upstream sent a {ev.get('type')} event without a block index")
    return index
