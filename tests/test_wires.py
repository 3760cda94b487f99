"""The wire formats alone (no server): each API's request read into what the guard reads, its upstream
events read into the core's events, the Responses store's bounds, and each API's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guardproxy.guard.scheduler import EngineOverloaded, EngineUnavailable, GuardFailure, PromptTooLong
from guardproxy.guard.template import ChatTemplate, ConversationError
from guardproxy.policy import Policy
from guardproxy.server.errors import ProxyError, engine_error, upstream_error
from guardproxy.server.store import ResponseStore
from guardproxy.server.wire_messages import MessagesWire, chat_messages
from guardproxy.server.wire_messages import chat_tools as anthropic_tools
from guardproxy.server.wire_responses import ResponsesWire, chat_tools, input_messages
from guardproxy.stream.guardview import CONTENT, REASONING
from guardproxy.stream.moderator import Out
from guardproxy.stream.outputs import Finish, Marker, Text, ToolArgs, ToolEnd
from guardproxy.stream.sse import SSEEvent

from .conftest import hf_chat_ids


def test_responses_items_read_as_the_chat_turns_they_are(template: ChatTemplate, hf_tokenizer: Any) -> None:
    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Weather in Paris?"},
                {"type": "input_image", "image_url": "x"},
            ],
        },
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Call the tool."}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 18C."}]},
        {"type": "item_reference", "id": "msg_0"},
        {"role": "user", "content": "Thanks"},
    ]
    messages = input_messages(items)
    assert messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Call the tool.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
        {"role": "user", "content": "Thanks"},
    ]
    # What the guard is fed is the Qwen3 template of those turns.
    assert template.render_prompt(messages).ids == hf_chat_ids(hf_tokenizer, messages)
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    for bad in (5, [3], [{"type": "message", "role": "wizard"}], [{"type": "function_call", "name": 1}]):
        with pytest.raises(ConversationError) as err:
            input_messages(bad)
        assert err.value.param == "input"


def test_responses_tools_take_the_chat_shape() -> None:
    tools = [
        {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}},
        {"type": "web_search"},
    ]
    assert chat_tools(tools) == [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}},
        {"type": "web_search"},
    ]


def test_responses_instructions_and_stored_turns_come_first() -> None:
    store = ResponseStore(10, 60)
    store.put("resp_1", [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "answer"}])
    wire = ResponsesWire(
        {"input": "now", "instructions": "Be brief.", "previous_response_id": "resp_1"}, Policy(), store
    )
    assert [m["content"] for m in wire.conversation().messages] == ["Be brief.", "earlier", "answer", "now"]
    with pytest.raises(ProxyError) as err:
        ResponsesWire(
            {"input": "x", "previous_response_id": "resp_9"},
            Policy(unknown_previous_response="refuse"),
            store,
        ).conversation()
    assert err.value.code == "previous_response_not_found"
    for body, param in (
        ({"model": "m"}, "input"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "stream": 1}, "stream"),
    ):
        with pytest.raises(ProxyError) as bad:
            ResponsesWire(body, Policy())
        assert bad.value.status == 400 and bad.value.param == param


def test_the_response_store_is_bounded_by_count_and_age() -> None:
    now = [0.0]
    store = ResponseStore(max_entries=2, max_age_s=10, clock=lambda: now[0])
    store.put("a", [{"role": "user", "content": "1"}])
    store.put("b", [])
    store.put("c", [])
    assert store.get("a") is None and len(store) == 2  # the oldest went
    now[0] = 11
    store.put("d", [])
    assert store.get("b") is None and store.get("c") is None and store.get("d") == []


def test_the_response_store_keeps_each_turn_once_and_rebuilds_chains() -> None:
    store = ResponseStore(max_entries=3, max_age_s=60)
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    store.put("r1", turn)
    store.put("r2", turn, parent="r1")
    store.put("r3", turn, parent="r2")
    assert store.get("r3") == turn * 3
    store.put("r4", turn, parent="r3")  # r1 goes: every chain through it is unknown now
    assert store.get("r4") is None and store.get("r2") is None
    store.put("loop", turn, parent="loop")
    assert store.get("loop") is None  # a cycle is no chain


def test_responses_events_are_read_into_the_core_events() -> None:
    wire = ResponsesWire({"input": "x", "stream": True}, Policy())

    def read(ev: dict[str, Any]) -> list[Any]:
        return wire.read_event(SSEEvent(json.dumps(ev), ev["type"]))

    assert read({"type": "response.created", "response": {"id": "resp_7"}}) == [
        Marker(0, {"type": "response.created", "response": {"id": "resp_7"}})
    ]
    assert read({"type": "response.output_text.delta", "item_id": "m", "delta": "Hi"}) == [
        Text(0, CONTENT, "Hi")
    ]
    assert read({"type": "response.reasoning_summary_text.delta", "item_id": "r", "delta": "hm"}) == [
        Text(0, REASONING, "hm")
    ]
    added = {
        "type": "response.output_item.added",
        "item": {"id": "fc", "type": "function_call", "name": "f", "arguments": '{"a"'},
    }
    out = read(added)  # arguments sent with the item are judged like any others
    assert out[1] == ToolArgs(0, 0, "f", '{"a"') and out[0].payload["item"]["arguments"] == ""
    assert out[0].call == 0  # the item's start is held with the call
    assert read({"type": "response.function_call_arguments.delta", "item_id": "fc", "delta": ": 1}"}) == [
        ToolArgs(0, 0, "f", ": 1}")
    ]
    done = {"type": "response.function_call_arguments.done", "item_id": "fc", "arguments": '{"a": 1}'}
    assert read(done) == [ToolEnd(0, 0), Marker(0, done, call=0)]
    end = {"type": "response.completed", "response": {"id": "resp_7"}}
    assert read(end) == [Finish(0, "stop", end)] and wire.upstream_done and wire.response_id == "resp_7"
    with pytest.raises(ProxyError, match="boom"):
        read({"type": "error", "message": "boom"})


def test_responses_events_get_indices_and_numbers_an_upstream_left_out() -> None:
    # llama.cpp's server sends no sequence_number, output_index or content_index.
    wire = ResponsesWire({"input": "x", "stream": True}, Policy(details=False))
    written = b"".join(
        wire.render(0, out, lambda: {})
        for out in [
            Out("marker", payload={"type": "response.created", "response": {"id": "r"}}),
            Out(
                "marker",
                payload={
                    "type": "response.output_item.added",
                    "item": {"id": "m", "type": "message", "content": []},
                },
            ),
            Out(
                "marker",
                payload={
                    "type": "response.content_part.added",
                    "item_id": "m",
                    "part": {"type": "output_text", "text": ""},
                },
            ),
            Out("text", field=CONTENT, text="Hello"),
            Out(
                "marker",
                payload={"type": "response.output_text.done", "item_id": "m", "text": "Hello, unjudged"},
            ),
            Out("finish", payload={"type": "response.completed", "response": {"id": "r", "output": []}}),
        ]
    )
    events = [json.loads(line[6:]) for line in written.decode().splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(6))
    delta = events[3]
    assert (delta["type"], delta["output_index"], delta["content_index"], delta["delta"]) == (
        "response.output_text.delta",
        0,
        0,
        "Hello",
    )
    assert events[4]["text"] == "Hello"  # the done event says what was released
    assert events[5]["response"]["output"] == []  # the upstream's own output list is kept as it is


def test_messages_blocks_read_as_the_chat_turns_they_are(template: ChatTemplate, hf_tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image", "source": {}}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "So?"},
            ],
        },
    ]
    chat = chat_messages([{"type": "text", "text": "Be brief."}], messages)
    assert chat == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "18C"},
        {"role": "user", "content": "So?"},
    ]
    assert template.render_prompt(chat).ids == hf_chat_ids(hf_tokenizer, chat)
    assert anthropic_tools([{"name": "f", "input_schema": {"type": "object"}}]) == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    for bad in ([], "x", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}]):
        with pytest.raises(ConversationError):
            chat_messages(None, bad)


def test_messages_events_are_read_into_the_core_events() -> None:
    wire = MessagesWire({"messages": [], "stream": True}, Policy())

    def read(ev: dict[str, Any]) -> list[Any]:
        return wire.read_event(SSEEvent(json.dumps(ev), ev["type"]))

    tool = {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}},
    }
    assert read(tool) == [Marker(0, tool, call=0)]  # a tool call's start is held with the call
    assert read(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
    ) == [Text(0, CONTENT, "Hi")]
    assert read(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}
    ) == [Text(0, REASONING, "hm")]
    assert read(
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "{"},
        }
    ) == [ToolArgs(0, 0, "f", "{")]
    tool_stop = {"type": "content_block_stop", "index": 1}
    assert read(tool_stop) == [ToolEnd(0, 0), Marker(0, tool_stop, call=0)]
    sig = {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "x"}}
    assert read(sig) == [Marker(0, sig)]
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}
    assert read(delta) == []  # held: it goes out with message_stop
    stop = {"type": "message_stop"}
    assert read(stop) == [Finish(0, "end_turn", (delta, stop))] and wire.upstream_done


def test_errors_take_each_apis_shape() -> None:
    e = ProxyError(429, "slow down", type="rate_limit_error", code="guard_overloaded")
    assert e.body() == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "guard_overloaded",
        }
    }
    assert e.body("anthropic") == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
    assert ProxyError(503, "x").body("anthropic")["error"]["type"] == "api_error"
    assert ProxyError(413, "x").body("anthropic")["error"]["type"] == "request_too_large"
    relayed = upstream_error(
        529, b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}'
    )
    assert (
        relayed.body("anthropic")["error"]["type"] == "overloaded_error"
        and relayed.body()["error"]["message"] == "busy"
    )
    assert engine_error(EngineOverloaded("full", retry_after=2.2)).headers == {"Retry-After": "3"}
    assert engine_error(PromptTooLong("long")).code == "context_length_exceeded"
    assert engine_error(GuardFailure("oom")).status == 503
    # A shared engine restarting: 503 (both SDKs retry it), with when to try again.
    gone = engine_error(EngineUnavailable("restarting", retry_after=1))
    assert (gone.status, gone.code, gone.headers) == (503, "guard_unavailable", {"Retry-After": "1"})
    assert gone.body("anthropic")["error"]["type"] == "api_error"
