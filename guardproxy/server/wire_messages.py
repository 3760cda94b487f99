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

import uuid
from collections.abc import Mapping
from typing import Any

from guardproxy.guard.template import ConversationError
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.server.errors import ProxyError, bad_request
from guardproxy.server.wire import (
    Conversation,
    Details,
    Wire,
    carried_text,
    dumps,
    parse_json,
    stripped,
)
from guardproxy.stream.guardview import CONTENT, REASONING, tool_field
from guardproxy.stream.moderator import Out
from guardproxy.stream.outputs import Event, Finish, Marker, Outputs, Text, ToolArgs, ToolEnd
from guardproxy.stream.sse import SSEEvent, encode_event

REFUSAL = "refusal"
_TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


def _text_blocks(value: Any, where: str) -> str:
    """The text of content given as a string or as blocks (``block_text`` of each, joined)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ConversationError(f"{where} must be a string or a list of content blocks", param="messages")
    texts = []
    for k, block in enumerate(value):
        if not isinstance(block, Mapping):
            raise ConversationError(f"{where}[{k}] must be an object", param="messages")
        text = block_text(block, f"{where}[{k}]")
        if text:
            texts.append(text)
    return "\n".join(texts)


# Blocks with no text the guard can read: pictures, encrypted reasoning, file references.
NO_TEXT_BLOCKS = frozenset({"image", "redacted_thinking", "container_upload"})
# Blocks that are tool calls the model made (its input is the arguments) and their results.
CALL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def block_text(block: Mapping[str, Any], where: str) -> str:
    """What the guard reads of one content block that is not a tool call or its result. ``text``,
    a text ``document`` (its title, context and text), a ``search_result`` (title and text blocks);
    ``image``, ``redacted_thinking`` and ``container_upload`` carry none; a block of any other kind is
    read for whatever text it holds (nothing the API adds goes unread)."""
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise ConversationError(f"{where}.text must be a string", param="messages")
        return text
    if kind in NO_TEXT_BLOCKS:
        return ""
    if kind == "document":
        source = block.get("source")
        parts = [block.get("title"), block.get("context")]
        if isinstance(source, Mapping) and source.get("type") == "text":
            parts.append(source.get("data"))
        elif isinstance(source, Mapping) and source.get("type") == "content":
            parts.append(_text_blocks(source.get("content") or [], f"{where}.source.content"))
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    if kind == "search_result":
        parts = [block.get("title"), _text_blocks(block.get("content") or [], f"{where}.content")]
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    text = carried_text({k: v for k, v in block.items() if k not in ("cache_control", "citations")})
    return "" if text is None else text if isinstance(text, str) else dumps(text)


def chat_messages(system: Any, messages: Any) -> list[dict[str, Any]]:
    """A Messages request's conversation as chat messages: what the guard's template renders.

    ``role: "system"`` entries among the messages (the ``mid-conversation-system`` beta Claude Code
    sends) are system turns where they stand, as the template renders a system message after the
    first."""
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
        if role not in ("user", "assistant", "system"):
            raise ConversationError(
                f"{where}.role must be user, assistant or system; got {role!r}", param="messages"
            )
        if role == "system":
            text = _text_blocks(content, f"{where}.content")
            if text:
                out.append({"role": "system", "content": text})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ConversationError(f"{where}.content must be a string or a list of blocks", param="messages")
        out += _block_turns(role, content, where)
    return out


def _block_turns(role: str, content: list[Any], where: str) -> list[dict[str, Any]]:
    """One message's blocks as chat messages, in their order: its text, reasoning and tool calls as a
    turn of its role, and each tool result as a tool turn after what came before it (a server tool's
    call and its result share the assistant's content). An assistant message gives a turn even when it
    holds no text: the template renders one."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []

    def flush(last: bool) -> None:
        if role == "assistant" and (texts or reasoning or calls or (last and not out)):
            turn: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if reasoning:
                turn["reasoning_content"] = "\n".join(reasoning)
            if calls:
                turn["tool_calls"] = list(calls)
            out.append(turn)
        elif role == "user" and texts:
            out.append({"role": "user", "content": "\n".join(texts)})
        texts.clear()
        reasoning.clear()
        calls.clear()

    for k, block in enumerate(content):
        w = f"{where}.content[{k}]"
        if not isinstance(block, Mapping):
            raise ConversationError(f"{w} must be an object", param="messages")
        kind = block.get("type")
        if kind == "thinking":
            if isinstance(block.get("thinking"), str):
                reasoning.append(block["thinking"])
        elif kind in CALL_BLOCKS:
            name = block.get("name")
            if not isinstance(name, str):
                raise ConversationError(f"{w}.name must be a string", param="messages")
            args = dumps(block.get("input") or {})
            calls.append(
                {"id": block.get("id"), "type": "function", "function": {"name": name, "arguments": args}}
            )
        elif isinstance(kind, str) and kind.endswith("tool_result"):
            # A tool's result (the client's tool_result, a server or MCP tool's): a tool turn.
            flush(last=False)
            result = block.get("content")
            if result is None or isinstance(result, str | list):
                text = "" if result is None else _text_blocks(result, f"{w}.content")
            else:
                text = block_text({"type": kind, "content": result}, w)
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        else:
            text = block_text(block, w)
            if text:
                texts.append(text)
    flush(last=True)
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
        if kind == "message_start":
            message = ev.get("message")
            if isinstance(message, Mapping) and message.get("content"):
                # Content comes in blocks, judged; none is taken from the opening snapshot.
                ev = {**ev, "message": {**message, "content": []}}
            return [Marker(0, ev)]
        if kind == "ping":
            return [Marker(0, ev)]
        if kind == "content_block_stop":
            index = int(ev.get("index", -1))
            call = self._block_calls.get(index)
            if call is not None:
                return [ToolEnd(0, call), Marker(0, ev, call=call)]
            return [Marker(0, ev, call=self._opaque_blocks.get(index))]  # goes with its block's start
        if kind == "content_block_start":
            return self._block_start(ev)
        if kind == "content_block_delta":
            delta = ev.get("delta")
            if not isinstance(delta, Mapping):
                raise ProxyError(
                    502, "upstream sent a content_block_delta without a delta", type="upstream_error"
                )
            dtype = str(delta.get("type"))
            index = int(ev.get("index", -1))
            if dtype in _TEXT_DELTAS:
                self._deltas += 1
                key = _TEXT_DELTAS[dtype]
                text = delta.get(key)
                if not isinstance(text, str):
                    raise ProxyError(502, f"upstream sent a {dtype} without {key}", type="upstream_error")
                if dtype == "text_delta":
                    return [Text(0, CONTENT, text)]
                if dtype == "thinking_delta":
                    return [Text(0, REASONING, text)]
                call = self._block_calls.get(index)
                if call is None:
                    raise ProxyError(
                        502, "upstream sent tool input outside a tool_use block", type="upstream_error"
                    )
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
            raise ProxyError(502, "upstream sent a malformed content_block_start", type="upstream_error")
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
            raise ProxyError(502, "upstream message has no content", type="upstream_error")
        self._original = body
        out: list[Event] = []
        lengths: dict[str, int] = {}
        for i, block in enumerate(body["content"]):
            if not isinstance(block, Mapping):
                raise ProxyError(
                    502, "upstream sent a content block that is not an object", type="upstream_error"
                )
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
                if stripped(events, block) is not None:
                    self._whole_replaced[i] = stripped(events, block)
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
        return encode_event(dumps(ev), event=str(ev["type"]))

    def render(self, output: int, out: Out, details: Details) -> bytes:
        if out.kind == "text":
            assert out.field is not None
            if out.field in self.silent:
                return b""  # an opaque block's or event's text: the event itself goes out whole
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
            if field is None and index in self._block_calls:
                field = tool_field(self._block_calls[index])
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
            "delta": {"stop_reason": REFUSAL, "stop_sequence": None, "stop_details": self._stop_details()},
            "usage": {"output_tokens": self._deltas},
        }
        if self.policy.details:
            delta["guardproxy"] = details()
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
            body["stop_details"] = self._stop_details()
        body["content"] = [self._whole_replaced.get(i, b) for i, b in enumerate(blocks)]
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
            "stop_details": self._stop_details(text),
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        if not self.streaming:
            if self.policy.details:
                message["guardproxy"] = details()
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
