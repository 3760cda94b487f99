"""The Anthropic Messages API (``POST /v1/messages``): one output per message.

Request -> guard: ``system`` (a string or text blocks) as the system turn; ``messages`` with string or
block content (``text``; ``tool_use`` as the assistant's tool calls; ``tool_result`` as tool messages;
``thinking`` as the assistant turn's reasoning; images, documents and redacted thinking have no text for
the guard); ``tools`` in the chat shape the template renders.

Upstream events -> core: ``text_delta`` is content, ``thinking_delta`` reasoning, ``input_json_delta``
a tool call's arguments; ``message_start``, ``ping``, ``content_block_start``/``stop``,
``signature_delta`` and any other event are markers, passed on in order. ``message_delta`` (the stop
reason) is held and goes out with ``message_stop``, the finish.

Core -> client: text becomes ``content_block_delta`` events of its block. A cut: the released text,
``content_block_stop`` for the open block, ``message_delta`` with ``stop_reason: "refusal"`` (what
Anthropic's API itself sends when its classifiers stop a stream), then ``message_stop``. Errors are
Anthropic-shaped, the ``error`` event once the stream has started.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from guardproxy.guard.template import ConversationError
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.server.errors import ProxyError, bad_request
from guardproxy.server.wire import Conversation, Details, Wire, dumps, parse_json
from guardproxy.stream.guardview import CONTENT, REASONING, tool_field
from guardproxy.stream.moderator import Out
from guardproxy.stream.outputs import Event, Finish, Marker, Outputs, Text, ToolArgs
from guardproxy.stream.sse import SSEEvent, encode_event

REFUSAL = "refusal"


def _text_blocks(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ConversationError(f"{where} must be a string or a list of content blocks", param="messages")
    texts = []
    for k, block in enumerate(value):
        if not isinstance(block, Mapping):
            raise ConversationError(f"{where}[{k}] must be an object", param="messages")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise ConversationError(f"{where}[{k}].text must be a string", param="messages")
            texts.append(text)
    return "\n".join(texts)


def chat_messages(system: Any, messages: Any) -> list[dict[str, Any]]:
    """A Messages request's conversation as chat messages: what the guard's template renders."""
    out: list[dict[str, Any]] = []
    if system is not None:
        text = _text_blocks(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list of message objects", param="messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ConversationError(f"{where} must be an object", param="messages")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant"):
            raise ConversationError(f"{where}.role must be user or assistant; got {role!r}", param="messages")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ConversationError(f"{where}.content must be a string or a list of blocks", param="messages")
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for k, block in enumerate(content):
            w = f"{where}.content[{k}]"
            if not isinstance(block, Mapping):
                raise ConversationError(f"{w} must be an object", param="messages")
            kind = block.get("type")
            if kind == "text":
                texts.append(_text_blocks([block], w))
            elif kind == "thinking" and role == "assistant":
                if isinstance(block.get("thinking"), str):
                    reasoning.append(block["thinking"])
            elif kind == "tool_use":
                name = block.get("name")
                if not isinstance(name, str):
                    raise ConversationError(f"{w}.name must be a string", param="messages")
                args = json.dumps(block.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {"id": block.get("id"), "type": "function", "function": {"name": name, "arguments": args}}
                )
            elif kind == "tool_result":
                result = block.get("content")
                text = "" if result is None else _text_blocks(result, f"{w}.content")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            # Images, documents, redacted thinking: nothing the text guard can read.
        if role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if reasoning:
                turn["reasoning_content"] = "\n".join(reasoning)
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
        elif texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of tool objects", param="tools")
    out = []
    for t in tools:
        if isinstance(t, Mapping) and "input_schema" in t:
            fn = {"name": t.get("name"), "description": t.get("description"), "parameters": t["input_schema"]}
            out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
        else:
            out.append(t)  # server tools (web search...) as they are
    return out


class MessagesWire(Wire):
    api = "anthropic"
    route = "/v1/messages"

    def __init__(self, body: dict[str, Any], policy: Policy) -> None:
        super().__init__(body, policy)
        if "messages" not in body:
            raise bad_request("messages: field required", param="messages")
        self._blocks: dict[int, tuple[str, int | None]] = {}  # upstream block index -> (type, tool call)
        self._names: dict[int, str | None] = {}  # tool call -> name
        self._message_delta: dict[str, Any] | None = None
        self._deltas = 0  # upstream content deltas read (about one a token): the usage of a cut answer
        # Writing to the client.
        self._open: dict[int, str] = {}  # blocks started and not stopped: index -> type
        self._field_block: dict[str, int] = {}  # the block each field's text goes to
        self._next_block = 0
        self._snapshot: dict[str, Any] = {}
        self._original: dict[str, Any] | None = None
        self._whole_map: list[tuple[int, str, int, int]] = []  # (block, field, start, end)

    def conversation(self) -> Conversation:
        return Conversation(
            chat_messages(self.body.get("system"), self.body.get("messages")),
            chat_tools(self.body.get("tools")),
        )

    # -- upstream ----------------------------------------------------------------------------------

    def read_event(self, event: SSEEvent) -> list[Event]:
        ev = parse_json(event.data, "an event")
        kind = ev.get("type") or event.event
        if kind == "error":
            err = ev["error"] if isinstance(ev.get("error"), Mapping) else {}
            raise ProxyError(
                502, str(err.get("message") or "upstream error"), type=str(err.get("type") or "api_error")
            )
        if kind == "message_delta":
            self._message_delta = ev  # goes out with message_stop, the end of the message
            return []
        if kind == "message_stop":
            self.upstream_done = True
            reason = (self._message_delta or {}).get("delta", {}).get("stop_reason")
            return [Finish(0, reason, (self._message_delta, ev))]
        if kind == "content_block_start":
            block = ev.get("content_block")
            if not isinstance(block, Mapping) or not isinstance(ev.get("index"), int):
                raise ProxyError(502, "upstream sent a malformed content_block_start", type="upstream_error")
            index, btype = ev["index"], str(block.get("type"))
            call = None
            if btype == "tool_use":
                call = len(self._names)
                self._names[call] = block.get("name")
            self._blocks[index] = (btype, call)
            # Text that comes with the block's start is judged as any other (rare, but allowed).
            first: list[Event] = []
            if btype == "text" and block.get("text"):
                first = [Text(0, CONTENT, str(block["text"]))]
            elif btype == "thinking" and block.get("thinking"):
                first = [Text(0, REASONING, str(block["thinking"]))]
            elif btype == "tool_use" and block.get("input"):
                first = [
                    ToolArgs(0, call or 0, block.get("name"), json.dumps(block["input"], ensure_ascii=False))
                ]
            if first:
                empty = (
                    {**block, "text": ""}
                    if btype == "text"
                    else {**block, "thinking": ""}
                    if btype == "thinking"
                    else {**block, "input": {}}
                )
                return [Marker(0, {**ev, "content_block": empty}), *first]
            return [Marker(0, ev)]
        if kind == "content_block_delta":
            delta = ev.get("delta")
            if not isinstance(delta, Mapping):
                raise ProxyError(
                    502, "upstream sent a content_block_delta without a delta", type="upstream_error"
                )
            dtype = delta.get("type")
            if dtype in ("text_delta", "thinking_delta", "input_json_delta"):
                self._deltas += 1
                key = {
                    "text_delta": "text",
                    "thinking_delta": "thinking",
                    "input_json_delta": "partial_json",
                }[dtype]
                text = delta.get(key)
                if not isinstance(text, str):
                    raise ProxyError(502, f"upstream sent a {dtype} without {key}", type="upstream_error")
                if dtype == "text_delta":
                    return [Text(0, CONTENT, text)]
                if dtype == "thinking_delta":
                    return [Text(0, REASONING, text)]
                _, call = self._blocks.get(int(ev.get("index", -1)), ("tool_use", None))
                call = call if call is not None else 0
                return [ToolArgs(0, call, self._names.get(call), text)]
        return [Marker(0, ev)]

    def read_whole(self, raw: bytes) -> list[Event]:
        body = parse_json(raw, "a message")
        if not isinstance(body.get("content"), list):
            raise ProxyError(502, "upstream message has no content", type="upstream_error")
        self._original = body
        out: list[Event] = []
        lengths: dict[str, int] = {}
        calls = 0
        for i, block in enumerate(body["content"]):
            if not isinstance(block, Mapping):
                raise ProxyError(
                    502, "upstream sent a content block that is not an object", type="upstream_error"
                )
            btype = block.get("type")
            if btype == "tool_use":
                args = json.dumps(block.get("input") or {}, ensure_ascii=False)
                self._whole_map.append((i, tool_field(calls), 0, len(args)))
                out.append(ToolArgs(0, calls, block.get("name"), args))
                calls += 1
            elif btype in ("text", "thinking"):
                name, key = (CONTENT, "text") if btype == "text" else (REASONING, "thinking")
                text = block.get(key)
                if isinstance(text, str):
                    start = lengths.get(name, 0)
                    lengths[name] = start + len(text)
                    self._whole_map.append((i, name, start, start + len(text)))
                    out.append(Text(0, name, text))
        out.append(Finish(0, body.get("stop_reason")))
        return out

    # -- client: streamed ----------------------------------------------------------------------------

    @staticmethod
    def _emit(ev: dict[str, Any]) -> bytes:
        return encode_event(dumps(ev), event=str(ev["type"]))

    def render(self, output: int, out: Out, details: Details) -> bytes:
        if out.kind == "text":
            assert out.field is not None
            return self._text(out.field, out.text)
        if out.kind == "marker":
            return self._marker(dict(out.payload))
        if out.kind == "finish":
            return self._finish(out.payload, details)
        return self._cut(out.text, details)

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
            if field is None and btype == "tool_use":
                field = tool_field(sum(1 for name in self._field_block if name.startswith("tool_calls[")))
            if field is not None:
                self._field_block[field] = index
        elif kind == "content_block_stop":
            self._open.pop(int(ev.get("index", -1)), None)
        return self._emit(ev)

    def _text(self, name: str, text: str) -> bytes:
        pre = b""
        index = self._field_block.get(name)
        if index is None or index not in self._open:
            if name != CONTENT:
                raise ProxyError(502, "upstream sent content outside a content block", type="upstream_error")
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
            return self.error_event(
                ProxyError(502, "upstream ended the message before message_stop", type="upstream_error")
            )
        delta, stop = payload
        delta = dict(
            delta
            or {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": self._deltas},
            }
        )
        if self.policy.details:
            delta["guardproxy"] = details()
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
            "delta": {"stop_reason": REFUSAL, "stop_sequence": None},
            "usage": {"output_tokens": self._deltas},
        }
        if self.policy.details:
            delta["guardproxy"] = details()
        out.append(self._emit(delta))
        out.append(self._emit({"type": "message_stop"}))
        return b"".join(out)

    def error_event(self, exc: ProxyError) -> bytes:
        return self._emit(exc.body("anthropic"))

    # -- client: whole -------------------------------------------------------------------------------

    def whole(self, outputs: Outputs, details: Details) -> dict[str, Any]:
        assert self._original is not None
        body = dict(self._original)
        m = outputs.moderators.get(0)
        blocks = [dict(b) for b in body["content"]]
        keep = len(blocks)
        for i, name, start, end in self._whole_map:
            shown = m.shown(name, start, end) if m is not None else ""
            full = m is not None and name in m.fields and shown == m.fields[name].text[start:end]
            if name.startswith("tool_calls["):
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
        body["content"] = blocks
        if self.policy.details:
            body["guardproxy"] = details()
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
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        if not self.streaming:
            if self.policy.details:
                message["guardproxy"] = details()
            return message
        start = {**message, "content": [], "stop_reason": None}
        end: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": REFUSAL, "stop_sequence": None},
            "usage": {"output_tokens": 0},
        }
        if self.policy.details:
            end["guardproxy"] = details()
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
