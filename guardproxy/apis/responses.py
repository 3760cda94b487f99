"""The OpenAI Responses API (``POST /v1/responses``, and its WebSocket mode): one output per response.

Request -> guard: ``instructions`` as the system turn, ``input`` and ``tools`` as
``responses_input.py`` reads them. With ``previous_response_id`` the earlier turns live upstream:
the guard reads those this proxy saw (``ResponseStore``); for an id it never saw, the policy's
``unknown_previous_response`` decides (judge what is visible, or refuse). ``background`` responses are
refused: their output would be fetched from the upstream later, past the guard.

Upstream events -> core: ``output_text``/``refusal`` deltas are content, ``reasoning_text`` and
``reasoning_summary_text`` deltas reasoning, ``function_call_arguments`` and ``custom_tool_call_input``
deltas a tool call's arguments (the call's events held with it and released whole); the events listed
in ``_NO_TEXT`` pass in order; every other event (hosted tools', unknown kinds) is read by
``Wire.opaque``. The terminal event (``response.completed``, ``.incomplete``, ``.failed``) is the finish.

Core -> client: ``ResponseEvents`` (``responses_events.py``) writes the events; an answer that is
not streamed is the upstream's response object with its texts as released (a cut: ``status:
"incomplete"``, ``incomplete_details.reason: "content_filter"``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from guardproxy.apis.errors import ProxyError, bad_request, bad_upstream, upstream_event_error
from guardproxy.apis.responses_events import ResponseEvents
from guardproxy.apis.responses_input import CALL_ITEMS, chat_tools, input_messages
from guardproxy.apis.responses_store import ResponseStore
from guardproxy.apis.wire import (
    Conversation,
    Details,
    Wire,
    optional_str,
    parse_json,
    stripped,
)
from guardproxy.guard.verdict import Verdict
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, REASONING, tool_field
from guardproxy.stream.moderator import CONTENT_FILTER, Out
from guardproxy.stream.outputs import Event, Finish, Marker, Outputs, Text, ToolArgs, ToolEnd
from guardproxy.stream.sse import SSEEvent

_TERMINAL = {"response.completed": "stop", "response.incomplete": "length", "response.failed": "failed"}
_CONTENT_DELTAS = ("response.output_text.delta", "response.refusal.delta")
_REASONING_DELTAS = ("response.reasoning_text.delta", "response.reasoning_summary_text.delta")
_CALL_DELTAS = ("response.function_call_arguments.delta", "response.custom_tool_call_input.delta")
_CALL_ENDS = (
    "response.function_call_arguments.done",
    "response.custom_tool_call_input.done",
    "response.output_item.done",
)
# Items whose text comes in the deltas above (their other events are rewritten to what was released).
_READ_ITEMS = frozenset({"message", "reasoning"})
# Events that carry no model text of their own: state, part boundaries, and the done events whose text
# ``ResponseEvents`` replaces with what was released. Every other event is read as ``opaque``.
_NO_TEXT = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.content_part.added",
        "response.content_part.done",
        "response.output_text.done",
        "response.refusal.done",
        "response.reasoning_text.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_part.done",
        "response.reasoning_summary_text.done",
        "response.output_text.annotation.added",  # a citation: a URL and the source's title
    }
)


# -- the client's events -----------------------------------------------------------------------------


class ResponsesWire(Wire):
    route = "/v1/responses"
    conversation_param = "input"

    def __init__(self, body: dict[str, Any], policy: Policy, store: ResponseStore | None = None) -> None:
        super().__init__(body, policy)
        if "input" not in body:
            raise bad_request("input is required", param="input")
        if body.get("background"):
            raise bad_request(
                "background responses are not supported by guardproxy: their output would be fetched "
                "from the upstream later, past the guard",
                param="background",
            )
        optional_str(body, "instructions")
        self.previous = optional_str(body, "previous_response_id")
        self.store = store
        self._turns: list[dict[str, Any]] | None = None  # the conversation, instructions left out
        self._input: list[dict[str, Any]] = []  # this request's own turns
        self._continues: str | None = None  # the stored response it continues, when known
        # Reading the upstream: tool calls by item id -> (tool call index, name); opaque events take
        # call indexes from the same count.
        self._read_calls: dict[str, tuple[int, str | None]] = {}
        self._read_kind: dict[str, str] = {}
        self._next_call = 0
        self.response_id: str | None = None
        # Writing to the client.
        self.events = ResponseEvents(policy)
        # An answer that is not streamed: where each text of its output sits in the core's fields,
        # (item, key, part, field, start, end); key "arguments" for a function call's.
        self._whole_map: list[tuple[int, str, int, str, int, int]] = []
        self._original: dict[str, Any] | None = None
        self._lengths: dict[str, int] = {}
        self._whole_replaced: dict[int, Any] = {}  # items with their text dropped (unknown_events: drop)

    # -- request -----------------------------------------------------------------------------------

    def conversation(self) -> Conversation:
        if self._turns is None:
            earlier: list[dict[str, Any]] | None = None
            if self.previous is not None:
                earlier = self.store.get(self.previous) if self.store is not None else None
                if earlier is None and self.policy.unknown_previous_response == "refuse":
                    raise ProxyError(
                        400,
                        f"previous_response_id {self.previous!r} is unknown to guardproxy: the earlier "
                        "turns cannot be judged (the policy refuses such requests)",
                        param="previous_response_id",
                        code="previous_response_not_found",
                    )
            self._continues = self.previous if earlier is not None else None
            self._input = input_messages(self.body.get("input"))
            self._turns = [*(earlier or []), *self._input]
        messages = list(self._turns)
        instructions = self.body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.insert(0, {"role": "system", "content": instructions})
        return Conversation(messages, chat_tools(self.body.get("tools")))

    def remember(self, store: ResponseStore, outputs: Outputs) -> None:
        """Keep this request's turns and the answer as the upstream holds it (all it sent, released or
        not), linked to the response it continued, for a request that continues it."""
        if self.response_id is None or self._turns is None or self.body.get("store") is False:
            return
        m = outputs.answer(0)
        answer: dict[str, Any] = {"role": "assistant", "content": ""}
        if m.came:
            answer["content"] = m.sent(CONTENT)
            if m.has(REASONING):
                answer["reasoning_content"] = m.sent(REASONING)
            calls = []
            for item_id, (k, name) in sorted(self._read_calls.items(), key=lambda c: c[1][0]):
                fn = {"name": name or "", "arguments": m.sent(tool_field(k))}
                calls.append({"id": item_id, "type": "function", "function": fn})
            if calls:
                answer["tool_calls"] = calls
        store.put(self.response_id, [*self._input, answer], parent=self._continues)

    # -- upstream ----------------------------------------------------------------------------------

    def read_event(self, event: SSEEvent) -> list[Event]:
        ev = parse_json(event.data, "an event")
        kind = str(ev.get("type") or event.event)
        if kind == "error":
            # Its "type" is the event's: the error is its message and code.
            raise upstream_event_error({"message": ev.get("message"), "code": ev.get("code")})
        if kind in _TERMINAL:
            self.upstream_done = True
            self._note_response(ev.get("response"))
            return [Finish(0, _TERMINAL[kind], ev)]
        if kind in ("response.created", "response.in_progress", "response.queued"):
            self._note_response(ev.get("response"))
        if kind in _CONTENT_DELTAS:
            return [Text(0, CONTENT, _delta(ev))]
        if kind in _REASONING_DELTAS:
            return [Text(0, REASONING, _delta(ev))]
        if kind == "response.output_item.added":
            return self._item_added(ev)
        item = ev.get("item")
        item_id = str(
            item.get("id")
            if kind == "response.output_item.done" and isinstance(item, Mapping)
            else ev.get("item_id")
        )
        call = self._read_calls.get(item_id)
        if call is not None:
            k, name = call
            if kind in _CALL_DELTAS:
                return [ToolArgs(0, k, name, _delta(ev))]
            if kind in _CALL_ENDS:
                return [ToolEnd(0, k), Marker(0, ev, call=k)]
            return [Marker(0, ev, call=k)]
        if kind in _NO_TEXT or (item_id in self._read_kind and self._read_kind[item_id] in _READ_ITEMS):
            return [Marker(0, ev)]
        # An event this wire does not read: a hosted tool's (web search, code interpreter, MCP...) or a
        # kind it does not know. Its text, if any, is judged whole (policy.unknown_events).
        k = self._next_call
        self._next_call += 1
        return self.opaque(0, k, kind, ev)

    def _item_added(self, ev: dict[str, Any]) -> list[Event]:
        item = ev.get("item")
        if not isinstance(item, Mapping):
            raise bad_upstream("upstream sent an output item that is not an object")
        item_id, kind = str(item.get("id")), str(item.get("type"))
        self._read_kind[item_id] = kind
        if kind in CALL_ITEMS:
            k = self._next_call
            self._next_call += 1
            name = str(item.get("name") or "")
            self._read_calls[item_id] = (k, name)
            self.events.calls[k] = item_id
            key = CALL_ITEMS[kind]
            args = item.get(key)
            out: list[Event] = [Marker(0, {**ev, "item": {**item, key: ""}}, call=k)]
            if isinstance(args, str) and args:  # arguments sent whole with the item: judged as text
                out.append(ToolArgs(0, k, name, args))
            return out
        if kind in _READ_ITEMS:
            return [Marker(0, ev)]
        k = self._next_call
        self._next_call += 1
        return self.opaque(0, k, kind, ev)

    def _note_response(self, response: Any) -> None:
        if isinstance(response, Mapping) and isinstance(response.get("id"), str):
            self.response_id = response["id"]

    def read_whole(self, raw: bytes) -> list[Event]:
        body = parse_json(raw, "a response")
        if not isinstance(body.get("output"), list):
            raise bad_upstream("upstream response has no output")
        self._original = body
        self._note_response(body)
        out: list[Event] = []
        for i, item in enumerate(body["output"]):
            if not isinstance(item, Mapping):
                raise bad_upstream("upstream sent an output item that is not an object")
            kind = str(item.get("type"))
            if kind in CALL_ITEMS or kind not in _READ_ITEMS:
                k = self._next_call
                self._next_call += 1
                if kind in CALL_ITEMS:
                    key = CALL_ITEMS[kind]
                    args = str(item.get(key) or "")
                    self._read_calls[str(item.get("id"))] = (k, str(item.get("name") or ""))
                    read: list[Event] = [ToolArgs(0, k, item.get("name"), args), ToolEnd(0, k)]
                else:  # a hosted tool's item, or a kind this wire does not know
                    key = "opaque"
                    read = self.opaque(0, k, kind, item)
                    args = next((e.text for e in read if isinstance(e, ToolArgs)), "")
                    if (emptied := stripped(read, item)) is not None:
                        self._whole_replaced[i] = emptied
                if any(isinstance(e, ToolArgs) for e in read):
                    self._whole_map.append((i, key, 0, tool_field(k), 0, len(args)))
                out += [e for e in read if not isinstance(e, Marker)]
                continue
            groups: list[tuple[str, Any]] = []
            if kind == "message":
                groups = [("content", CONTENT)]
            elif kind == "reasoning":
                groups = [("summary", REASONING), ("content", REASONING)]
            for key, name in groups:
                for j, part in enumerate(item.get(key) or []):
                    if not isinstance(part, Mapping):
                        continue
                    text = part.get("refusal" if part.get("type") == "refusal" else "text")
                    if not isinstance(text, str):
                        continue
                    start = self._lengths.get(name, 0)
                    self._lengths[name] = start + len(text)
                    self._whole_map.append((i, key, j, name, start, start + len(text)))
                    out.append(Text(0, name, text))
        out.append(Finish(0, str(body.get("status") or "completed")))
        return out

    # -- client: streamed ----------------------------------------------------------------------------

    def _render(self, output: int, out: Out, details: Details) -> bytes:
        return self.events.write(out, details)

    def error_event(self, exc: ProxyError) -> bytes:
        return self.events.error(exc)

    # -- client: whole -------------------------------------------------------------------------------

    def whole(self, outputs: Outputs, details: Details) -> dict[str, Any]:
        assert self._original is not None
        body = dict(self._original)
        m = outputs.answer(0)
        items = [dict(i) for i in body["output"]]
        keep = len(items)
        last_text: tuple[int, int] | None = None
        for i, key, j, name, start, end in self._whole_map:
            shown, full = m.shown(name, start, end), m.whole(name, start, end)
            if key not in ("content", "summary"):  # a tool call's input, or an item read whole
                if not full:
                    keep = min(keep, i)  # cut in it: no tool call, no item
                elif key != "opaque":
                    items[i][key] = shown
                continue
            parts = [dict(p) for p in items[i].get(key) or []]
            part = parts[j]
            part["refusal" if part.get("type") == "refusal" else "text"] = shown
            parts[j] = part
            items[i][key] = parts
            if part.get("type") == "output_text":
                last_text = (i, j)
            if not full:
                keep = min(keep, i + 1)
        if outputs.cut:
            if self.policy.notice and last_text is not None and last_text[0] < keep:
                i, index = last_text
                items[i]["content"][index]["text"] += self.policy.notice
            items = items[:keep]
            for item in items[-1:]:
                item["status"] = "incomplete"
            body.update(status="incomplete", incomplete_details={"reason": CONTENT_FILTER})
        body["output"] = [self._whole_replaced.get(i, item) for i, item in enumerate(items)]
        self.annotate(body, details)
        return body

    def blocked(self, verdict: Verdict, details: Details) -> list[bytes] | dict[str, Any]:
        text = self.policy.refusal
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        response: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": self.model or "",
            "status": "completed",
            "output": [message],
        }
        self.annotate(response, details)
        if not self.streaming:
            return response
        started = {**response, "status": "in_progress", "output": []}
        started.pop("guardproxy", None)
        part = {"type": "output_text", "text": "", "annotations": []}
        base = {"item_id": mid, "output_index": 0, "content_index": 0}
        return [
            self.events.emit({"type": "response.created", "response": started}),
            self.events.emit(
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {**message, "status": "in_progress", "content": []},
                }
            ),
            self.events.emit({"type": "response.content_part.added", **base, "part": part}),
            self.events.emit({"type": "response.output_text.delta", **base, "delta": text, "logprobs": []}),
            self.events.emit({"type": "response.output_text.done", **base, "text": text, "logprobs": []}),
            self.events.emit({"type": "response.content_part.done", **base, "part": {**part, "text": text}}),
            self.events.emit({"type": "response.output_item.done", "output_index": 0, "item": message}),
            self.events.emit({"type": "response.completed", "response": response}),
        ]


def _delta(ev: Mapping[str, Any]) -> str:
    delta = ev.get("delta")
    if not isinstance(delta, str):
        raise bad_upstream(f"upstream sent a {ev.get('type')} event without a text delta")
    return delta
