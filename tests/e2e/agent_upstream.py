"""A scripted upstream for the agent clients (Claude Code, Codex, the OpenAI Agents SDK): each request on
an API gets the next turn of that API's script, written as the real service streams it (the last turn
repeats when a client asks again). A turn is text pieces and tool calls:

    Turn(text=["Hel", "lo"])                                       plain answer
    Turn(calls=[Call("Bash", ['{"command": "ec', 'ho hi"}'])])     a tool call, its input in pieces

On the Messages API a call is a ``tool_use`` block; on the Responses API a ``function_call`` item, or a
``custom_tool_call`` item when ``Call.custom`` (Codex's ``apply_patch``, freeform input); on chat
completions a ``tool_calls`` delta. Every request is recorded (path with its query, headers, body)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Call:
    name: str
    pieces: list[str]  # the input as streamed: JSON text, or a custom tool's raw input
    custom: bool = False


@dataclass
class Turn:
    text: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: dict[str, Any]


class AgentUpstream:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Turn]] = {}
        self.seen: list[Seen] = []

    def script(self, api: str, *turns: Turn) -> None:
        self.scripts[api] = list(turns)
        self.seen.clear()

    def requests(self, api_path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.path_qs.split("?")[0] == api_path]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _turn(self, request: web.Request, api: str) -> tuple[Turn, dict[str, Any]]:
        body = await request.json()
        self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        turns = self.scripts.get(api) or [Turn(text=["ok"])]
        answered = len(self.requests(request.path)) - 1
        return turns[min(answered, len(turns) - 1)], body

    @staticmethod
    async def _sse(
        request: web.Request, events: list[tuple[str | None, dict[str, Any] | str]]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "request-id": "req_agent_1"})
        await resp.prepare(request)
        for name, data in events:
            head = f"event: {name}\n" if name else ""
            payload = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"{head}data: {payload}\n\n".encode())
        await resp.write_eof()
        return resp

    # -- Anthropic Messages ------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        turn, body = await self._turn(request, "messages")
        out: list[tuple[str | None, dict[str, Any] | str]] = []

        def add(kind: str, **fields: Any) -> None:
            out.append((kind, {"type": kind, **fields}))

        message = {
            "id": f"msg_{len(self.seen)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "m"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        }
        add("message_start", message=message)
        index = 0
        if turn.text:
            add("content_block_start", index=index, content_block={"type": "text", "text": ""})
            for piece in turn.text:
                add("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})
            add("content_block_stop", index=index)
            index += 1
        for k, call in enumerate(turn.calls):
            block = {"type": "tool_use", "id": f"toolu_{len(self.seen)}_{k}", "name": call.name, "input": {}}
            add("content_block_start", index=index, content_block=block)
            for piece in call.pieces:
                add(
                    "content_block_delta",
                    index=index,
                    delta={"type": "input_json_delta", "partial_json": piece},
                )
            add("content_block_stop", index=index)
            index += 1
        stop = "tool_use" if turn.calls else "end_turn"
        add("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage={"output_tokens": 5})
        add("message_stop")
        return await self._sse(request, out)

    # -- OpenAI Responses --------------------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        turn, body = await self._turn(request, "responses")
        rid = f"resp_{len(self.seen)}"
        out: list[tuple[str | None, dict[str, Any] | str]] = []

        def add(kind: str, **fields: Any) -> None:
            out.append((kind, {"type": kind, "sequence_number": len(out), **fields}))

        base = {"id": rid, "object": "response", "created_at": 1765000000, "model": body.get("model", "m")}
        add("response.created", response={**base, "status": "in_progress", "output": []})
        items: list[dict[str, Any]] = []
        if turn.text:
            msg = {
                "id": f"msg_{rid}",
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            ids = {"item_id": msg["id"], "output_index": len(items), "content_index": 0}
            add("response.output_item.added", output_index=len(items), item=msg)
            add(
                "response.content_part.added",
                **ids,
                part={"type": "output_text", "text": "", "annotations": []},
            )
            for piece in turn.text:
                add("response.output_text.delta", **ids, delta=piece, logprobs=[])
            text = "".join(turn.text)
            part = {"type": "output_text", "text": text, "annotations": []}
            add("response.output_text.done", **ids, text=text, logprobs=[])
            add("response.content_part.done", **ids, part=part)
            done = {**msg, "status": "completed", "content": [part]}
            add("response.output_item.done", output_index=len(items), item=done)
            items.append(done)
        for k, call in enumerate(turn.calls):
            kind, key = ("custom_tool_call", "input") if call.custom else ("function_call", "arguments")
            delta, finished = (
                ("response.custom_tool_call_input.delta", "response.custom_tool_call_input.done")
                if call.custom
                else ("response.function_call_arguments.delta", "response.function_call_arguments.done")
            )
            item = {
                "id": f"ctc_{rid}_{k}",
                "type": kind,
                "call_id": f"call_{rid}_{k}",
                "name": call.name,
                key: "",
            }
            if not call.custom:
                item["status"] = "in_progress"
            add("response.output_item.added", output_index=len(items), item=item)
            for piece in call.pieces:
                add(delta, item_id=item["id"], output_index=len(items), delta=piece)
            whole = "".join(call.pieces)
            add(finished, item_id=item["id"], output_index=len(items), **{key: whole})
            done = {**item, key: whole, **({} if call.custom else {"status": "completed"})}
            add("response.output_item.done", output_index=len(items), item=done)
            items.append(done)
        usage = {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 15,
        }
        add("response.completed", response={**base, "status": "completed", "output": items, "usage": usage})
        return await self._sse(request, out)

    # -- OpenAI chat completions -------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        turn, _ = await self._turn(request, "chat")
        base = {
            "id": "chatcmpl-agent",
            "object": "chat.completion.chunk",
            "created": 1765000000,
            "model": "m",
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[None, dict[str, Any]]:
            return None, {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        out: list[tuple[str | None, dict[str, Any] | str]] = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": piece}) for piece in turn.text]
        for k, call in enumerate(turn.calls):
            head = {
                "index": k,
                "id": f"call_{k}",
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            out.append(chunk({"tool_calls": [head]}))
            out += [chunk({"tool_calls": [{"index": k, "function": {"arguments": p}}]}) for p in call.pieces]
        out.append(chunk({}, "tool_calls" if turn.calls else "stop"))
        out.append((None, "[DONE]"))
        return await self._sse(request, out)
