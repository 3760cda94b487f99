"""The Responses API's events as the client gets them: what the core releases (text, markers, the finish,
the cut) written as ``response.*`` events, for ``ResponsesWire``.

Text becomes delta events of the part it belongs to (the part opened last for its field, or one this
writer opens when the upstream never announced it); the ``*.done`` events, the items in
``output_item.done`` and the final response carry what was released (redactions included); every
event gets a strictly increasing ``sequence_number`` and its ``output_index``/``content_index``
(filled in where an upstream, llama.cpp's server for one, leaves them out). A cut: the open parts and
items are closed with what was released (status ``incomplete``), then ``response.incomplete`` with
``incomplete_details.reason: "content_filter"``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guardproxy.apis.errors import ProxyError, bad_upstream
from guardproxy.apis.wire import Details, EventWriter, event_json
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, REASONING, tool_call_of
from guardproxy.stream.moderator import CONTENT_FILTER
from guardproxy.stream.sse import encode_event

# Done events of a part, and the key that holds its text.
_PART_TEXT_DONE = {
    "response.output_text.done": "text",
    "response.refusal.done": "refusal",
    "response.reasoning_text.done": "text",
    "response.reasoning_summary_text.done": "text",
}


# Tool calls the model writes the input of: item type -> the key holding it.
_CALL_INPUT = {"function_call": "arguments", "custom_tool_call": "input"}


@dataclass
class _Part:
    kind: str  # output_text | refusal | reasoning_text | summary_text
    index: int  # content_index, or summary_index for summary_text
    text: str = ""  # as released
    done: bool = False


@dataclass
class _Item:
    id: str
    kind: str
    output_index: int
    item: dict[str, Any]
    parts: list[_Part] = field(default_factory=list)
    arguments: str = ""  # a function call's, as released
    done: bool = False


class ResponseEvents(EventWriter):
    """One response's events to the client, numbered, with the items and parts they build."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._seq = 0
        self._snapshot: dict[str, Any] = {}
        self._items: dict[str, _Item] = {}
        self.calls: dict[int, str] = {}  # item ids of tool calls by tool call index (filled by the reader)
        self._current: dict[str, tuple[_Item, _Part]] = {}  # the open part each field's text goes to
        self._next_output = 0
        self._done: dict[int, dict[str, Any]] = {}  # output items as sent in output_item.done, by index

    def emit(self, ev: dict[str, Any]) -> bytes:
        ev["sequence_number"] = self._seq
        self._seq += 1
        return encode_event(event_json(ev), event=str(ev["type"]))

    def _marker(self, ev: dict[str, Any]) -> bytes:
        kind = ev.get("type")
        if kind in ("response.created", "response.in_progress", "response.queued"):
            self._snapshot = {**self._snapshot, **(ev.get("response") or {})}
            return self.emit(ev)
        if kind == "response.output_item.added":
            item = dict(ev["item"])
            index = ev.get("output_index")
            index = index if isinstance(index, int) else self._next_output
            self._next_output = max(self._next_output, index + 1)
            tracked = _Item(
                str(item.get("id") or f"item_{uuid.uuid4().hex}"), str(item.get("type")), index, item
            )
            self._items[tracked.id] = tracked
            if tracked.kind in _CALL_INPUT:
                item[_CALL_INPUT[tracked.kind]] = ""
            elif tracked.kind == "message":
                item["content"] = []  # parts and their text come as events, judged
            elif tracked.kind == "reasoning":
                item["summary"] = []
            return self.emit({**ev, "item": item, "output_index": index})
        done_item = ev.get("item")  # output_item.done names its item inside it
        item_id = str(
            done_item.get("id")
            if kind == "response.output_item.done" and isinstance(done_item, Mapping)
            else ev.get("item_id")
        )
        tracked_item = self._items.get(item_id)
        if tracked_item is None:
            return self.emit(ev)  # an event of an item this proxy did not see start: passed as it is
        ev["output_index"] = tracked_item.output_index
        if kind in ("response.content_part.added", "response.reasoning_summary_part.added"):
            summary = kind == "response.reasoning_summary_part.added"
            part = dict(ev.get("part") or {})
            key = "summary_index" if summary else "content_index"
            index = ev.get(key)
            index = (
                index
                if isinstance(index, int)
                else sum(1 for p in tracked_item.parts if (p.kind == "summary_text") == summary)
            )
            kind_of = "summary_text" if summary else str(part.get("type") or "output_text")
            tracked_part = _Part(kind_of, index)
            tracked_item.parts.append(tracked_part)
            self._current[REASONING if kind_of in ("summary_text", "reasoning_text") else CONTENT] = (
                tracked_item,
                tracked_part,
            )
            if "text" in part:
                part["text"] = ""
            if "refusal" in part:
                part["refusal"] = ""
            return self.emit({**ev, key: index, "part": part})
        if kind in _PART_TEXT_DONE or kind in (
            "response.content_part.done",
            "response.reasoning_summary_part.done",
        ):
            summary = "summary" in str(kind)
            key = "summary_index" if summary else "content_index"
            found = self._find_part(tracked_item, ev.get(key), summary)
            if found is not None:
                ev[key] = found.index
                if kind in _PART_TEXT_DONE:
                    ev[_PART_TEXT_DONE[str(kind)]] = found.text
                else:
                    part = dict(ev.get("part") or {})
                    part["refusal" if found.kind == "refusal" else "text"] = found.text
                    ev["part"] = part
                    found.done = True
            return self.emit(ev)
        if kind == "response.function_call_arguments.done":
            ev["arguments"] = tracked_item.arguments
            return self.emit(ev)
        if kind == "response.custom_tool_call_input.done":
            ev["input"] = tracked_item.arguments
            return self.emit(ev)
        if kind == "response.output_item.done":
            final = self._final_item(tracked_item, dict(ev.get("item") or tracked_item.item))
            return self.emit({**ev, "item": final})
        return self.emit(ev)

    @staticmethod
    def _find_part(item: _Item, index: Any, summary: bool) -> _Part | None:
        parts = [p for p in item.parts if (p.kind == "summary_text") == summary]
        for p in parts:
            if p.index == index:
                return p
        return parts[-1] if parts else None

    def _final_item(self, item: _Item, raw: dict[str, Any], status: str | None = None) -> dict[str, Any]:
        """An output item with its texts as released."""
        item.done = True
        final = dict(raw)
        if item.kind in _CALL_INPUT:
            final[_CALL_INPUT[item.kind]] = item.arguments
        elif item.kind == "message":
            content = [dict(c) for c in final.get("content") or []]
            for p in item.parts:
                if p.index < len(content):
                    content[p.index]["refusal" if p.kind == "refusal" else "text"] = p.text
                else:
                    content.append(
                        {"type": p.kind, "refusal": p.text}
                        if p.kind == "refusal"
                        else {"type": "output_text", "text": p.text, "annotations": []}
                    )
            final["content"] = content
        elif item.kind == "reasoning":
            for key, kind in (("summary", "summary_text"), ("content", "reasoning_text")):
                parts = [dict(c) for c in final.get(key) or []]
                for p in item.parts:
                    if p.kind != kind:
                        continue
                    while p.index >= len(parts):
                        parts.append({"type": kind, "text": ""})
                    parts[p.index]["text"] = p.text
                if parts or key == "summary":
                    final[key] = parts
        if status is not None:
            final["status"] = status
        self._done[item.output_index] = final
        return final

    def _open_part(self, name: str) -> tuple[list[bytes], _Item, _Part]:
        """The part ``name``'s text goes to; one is opened (with its item) when the upstream never
        announced it."""
        cur = self._current.get(name)
        if cur is not None and not cur[0].done and not cur[1].done:
            return [], cur[0], cur[1]
        pre: list[bytes] = []
        kind = "message" if name == CONTENT else "reasoning"
        item = next((i for i in reversed(self._items.values()) if i.kind == kind and not i.done), None)
        if item is None:
            raw: dict[str, Any] = {
                "id": f"{'msg' if kind == 'message' else 'rs'}_{uuid.uuid4().hex}",
                "type": kind,
            }
            raw.update(
                {"role": "assistant", "status": "in_progress", "content": []}
                if kind == "message"
                else {"summary": []}
            )
            pre.append(self._marker({"type": "response.output_item.added", "item": raw}))
            item = self._items[raw["id"]]
        if kind == "message":
            added = {
                "type": "response.content_part.added",
                "item_id": item.id,
                "part": {"type": "output_text", "text": "", "annotations": []},
            }
        else:
            added = {
                "type": "response.reasoning_summary_part.added",
                "item_id": item.id,
                "part": {"type": "summary_text", "text": ""},
            }
        pre.append(self._marker(added))
        cur = self._current[name]
        return pre, cur[0], cur[1]

    def _text(self, name: str, text: str) -> bytes:
        if (k := tool_call_of(name)) is not None:
            item = self._items[self.calls[k]]
            item.arguments += text
            kind = (
                "response.custom_tool_call_input.delta"
                if item.kind == "custom_tool_call"
                else "response.function_call_arguments.delta"
            )
            return self.emit(
                {"type": kind, "item_id": item.id, "output_index": item.output_index, "delta": text}
            )
        pre, item, part = self._open_part(name)
        part.text += text
        base = {"item_id": item.id, "output_index": item.output_index, "delta": text}
        if part.kind == "summary_text":
            ev = {"type": "response.reasoning_summary_text.delta", **base, "summary_index": part.index}
        elif part.kind == "reasoning_text":
            ev = {"type": "response.reasoning_text.delta", **base, "content_index": part.index}
        elif part.kind == "refusal":
            ev = {"type": "response.refusal.delta", **base, "content_index": part.index}
        else:
            ev = {"type": "response.output_text.delta", **base, "content_index": part.index, "logprobs": []}
        return b"".join(pre) + self.emit(ev)

    def _response(self, base: Any, details: Details) -> dict[str, Any]:
        resp = {**self._snapshot, **(base if isinstance(base, Mapping) else {})}
        # The output is the items the client was given, as released: an item of the upstream's final
        # response that was never streamed was never judged, and is left out.
        resp["output"] = [self._done[i] for i in sorted(self._done)]
        if self.policy.details:
            resp["guardproxy"] = details()
        return resp

    def _finish(self, ev: Any, details: Details) -> bytes:
        if not isinstance(ev, Mapping):  # the upstream stopped without its last event
            return self.error(bad_upstream("upstream ended the response before its final event"))
        return self.emit({**ev, "response": self._response(ev.get("response"), details)})

    def _close_part(self, item: _Item, p: _Part) -> list[bytes]:
        """The done events of a part left open by a cut, with what was released of it."""
        base = {"item_id": item.id, "output_index": item.output_index}
        p.done = True
        if p.kind == "summary_text":
            part: dict[str, Any] = {"type": "summary_text", "text": p.text}
            done = {"type": "response.reasoning_summary_text.done", "summary_index": p.index, "text": p.text}
            closed = {"type": "response.reasoning_summary_part.done", "summary_index": p.index, "part": part}
            return [self.emit({**done, **base}), self.emit({**closed, **base})]
        key = "refusal" if p.kind == "refusal" else "text"
        kind = {"refusal": "response.refusal.done", "reasoning_text": "response.reasoning_text.done"}
        part = {"type": p.kind, key: p.text, **({"annotations": []} if p.kind == "output_text" else {})}
        done = {"type": kind.get(p.kind, "response.output_text.done"), "content_index": p.index, key: p.text}
        closed = {"type": "response.content_part.done", "content_index": p.index, "part": part}
        return [self.emit({**done, **base}), self.emit({**closed, **base})]

    def _cut(self, notice: str, details: Details) -> bytes:
        out: list[bytes] = []
        cur = self._current.get(CONTENT)
        if (
            notice
            and cur is not None
            and not cur[0].done
            and not cur[1].done
            and cur[1].kind == "output_text"
        ):
            out.append(self._text(CONTENT, notice))
        for item in sorted((i for i in self._items.values() if not i.done), key=lambda i: i.output_index):
            for p in item.parts:
                if not p.done:
                    out += self._close_part(item, p)
            base = {"item_id": item.id, "output_index": item.output_index}
            if item.kind == "function_call":
                done = {"type": "response.function_call_arguments.done", "arguments": item.arguments}
                out.append(self.emit({**done, **base}))
            final = self._final_item(item, item.item, status="incomplete")
            out.append(
                self.emit(
                    {"type": "response.output_item.done", "output_index": item.output_index, "item": final}
                )
            )
        resp = self._response({}, details)
        resp.update(status="incomplete", incomplete_details={"reason": CONTENT_FILTER})
        out.append(self.emit({"type": "response.incomplete", "response": resp}))
        return b"".join(out)

    def error(self, exc: ProxyError) -> bytes:
        return self.emit({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
