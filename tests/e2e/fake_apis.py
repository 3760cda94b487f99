"""What the fake upstream sends on the OpenAI Responses API and the Anthropic Messages API: the event
sequences (and whole bodies) of the real services, as their API references and SDK types describe them
(``sequence_number``, ``output_index`` and ``content_index`` on Responses events; ``message_start``,
blocks, ``ping``, ``signature_delta``, ``message_delta``, ``message_stop`` on Messages), built from
a test's script: ``reasoning`` pieces, ``pieces[0]`` (the answer's text), ``tool_args`` (one tool call)."""

from __future__ import annotations

import json
from typing import Any

Event = tuple[str, dict[str, Any]]


def responses_events(
    body: dict[str, Any],
    reasoning: list[str],
    text: list[str],
    tool_args: list[str],
    rid: str,
    *,
    custom_tool: bool = False,
) -> list[Event]:
    model = body.get("model", "fake-model")
    base = {"id": rid, "object": "response", "created_at": 1763800000, "model": model, "output": []}
    out: list[Event] = []

    def add(kind: str, **fields: Any) -> None:
        out.append((kind, {"type": kind, "sequence_number": len(out), **fields}))

    add("response.created", response={**base, "status": "in_progress"})
    add("response.in_progress", response={**base, "status": "in_progress"})
    items: list[dict[str, Any]] = []
    if reasoning:
        rs = {"id": "rs_1", "type": "reasoning", "summary": []}
        idx = len(items)
        add("response.output_item.added", output_index=idx, item=rs)
        ids = {"item_id": "rs_1", "output_index": idx, "summary_index": 0}
        add("response.reasoning_summary_part.added", **ids, part={"type": "summary_text", "text": ""})
        for r in reasoning:
            add("response.reasoning_summary_text.delta", **ids, delta=r)
        whole = "".join(reasoning)
        add("response.reasoning_summary_text.done", **ids, text=whole)
        add("response.reasoning_summary_part.done", **ids, part={"type": "summary_text", "text": whole})
        done = {**rs, "summary": [{"type": "summary_text", "text": whole}]}
        add("response.output_item.done", output_index=idx, item=done)
        items.append(done)
    if text:
        msg = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        idx = len(items)
        add("response.output_item.added", output_index=idx, item=msg)
        ids = {"item_id": "msg_1", "output_index": idx, "content_index": 0}
        add("response.content_part.added", **ids, part={"type": "output_text", "text": "", "annotations": []})
        for piece in text:
            add("response.output_text.delta", **ids, delta=piece, logprobs=[])
        whole = "".join(text)
        add("response.output_text.done", **ids, text=whole, logprobs=[])
        part = {"type": "output_text", "text": whole, "annotations": []}
        add("response.content_part.done", **ids, part=part)
        done = {**msg, "status": "completed", "content": [part]}
        add("response.output_item.done", output_index=idx, item=done)
        items.append(done)
    if tool_args:
        # A function call, or a custom tool call: free-form input (Codex's apply_patch).
        kind, key, name, iid = (
            ("custom_tool_call", "input", "apply_patch", "ctc_1")
            if custom_tool
            else ("function_call", "arguments", "weather", "fc_1")
        )
        event = "response.custom_tool_call_input" if custom_tool else "response.function_call_arguments"
        call: dict[str, Any] = {"id": iid, "type": kind, "call_id": "call_1", "name": name, key: ""}
        if not custom_tool:
            call["status"] = "in_progress"
        idx = len(items)
        add("response.output_item.added", output_index=idx, item=call)
        for a in tool_args:
            add(f"{event}.delta", item_id=iid, output_index=idx, delta=a)
        whole = "".join(tool_args)
        add(f"{event}.done", item_id=iid, output_index=idx, **{key: whole})
        done = {**call, key: whole, **({} if custom_tool else {"status": "completed"})}
        add("response.output_item.done", output_index=idx, item=done)
        items.append(done)
    usage = {"input_tokens": 7, "output_tokens": len(text), "total_tokens": 7 + len(text)}
    add("response.completed", response={**base, "status": "completed", "output": items, "usage": usage})
    return out


def responses_whole(events: list[Event]) -> dict[str, Any]:
    response: dict[str, Any] = events[-1][1]["response"]
    return response


def messages_events(
    body: dict[str, Any], reasoning: list[str], text: list[str], tool_args: list[str], mid: str
) -> list[Event]:
    out: list[Event] = []

    def add(kind: str, **fields: Any) -> None:
        out.append((kind, {"type": kind, **fields}))

    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake-model"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 1},
    }
    add("message_start", message=message)
    index = 0
    if reasoning:
        add(
            "content_block_start",
            index=index,
            content_block={"type": "thinking", "thinking": "", "signature": ""},
        )
        for r in reasoning:
            add("content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": r})
        add("content_block_delta", index=index, delta={"type": "signature_delta", "signature": "c2lnbmVk"})
        add("content_block_stop", index=index)
        index += 1
    if text:
        add("content_block_start", index=index, content_block={"type": "text", "text": ""})
        add("ping")
        for piece in text:
            add("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})
        add("content_block_stop", index=index)
        index += 1
    if tool_args:
        block = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}
        add("content_block_start", index=index, content_block=block)
        for a in tool_args:
            add("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": a})
        add("content_block_stop", index=index)
    stop = "tool_use" if tool_args else "end_turn"
    add(
        "message_delta",
        delta={"stop_reason": stop, "stop_sequence": None},
        usage={"output_tokens": len(text)},
    )
    add("message_stop")
    return out


def messages_whole(
    body: dict[str, Any], reasoning: list[str], text: list[str], tool_args: list[str], mid: str
) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reasoning:
        content.append({"type": "thinking", "thinking": "".join(reasoning), "signature": "c2lnbmVk"})
    if text:
        content.append({"type": "text", "text": "".join(text)})
    if tool_args:
        content.append(
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": json.loads("".join(tool_args))}
        )
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake-model"),
        "content": content,
        "stop_reason": "tool_use" if tool_args else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": len(text)},
    }


def insert_before_end(kind: str, events: list[Event], extra: list[Event]) -> list[Event]:
    """``extra`` events put just before an answer's end: Responses' terminal event, Messages'
    ``message_delta``, chat's first chunk with a finish reason (``kind``: responses, messages, chat)."""

    def ends(e: Event) -> bool:
        data = e[1]
        if kind == "responses":
            return str(data.get("type")) in ("response.completed", "response.incomplete", "response.failed")
        if kind == "messages":
            return data.get("type") == "message_delta"
        return any(c.get("finish_reason") for c in data.get("choices") or [])

    at = next((k for k, e in enumerate(events) if ends(e)), len(events))
    return [*events[:at], *extra, *events[at:]]
