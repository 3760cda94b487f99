"""The wire formats alone (no server): each API's request read into what the guard reads, its upstream
events read into the core's events, the Responses store's bounds, and each API's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guardproxy.apis.chat import ChatWire
from guardproxy.apis.errors import ProxyError, engine_error, upstream_error
from guardproxy.apis.messages import MessagesWire
from guardproxy.apis.messages_request import chat_messages
from guardproxy.apis.messages_request import chat_tools as anthropic_tools
from guardproxy.apis.responses import ResponsesWire
from guardproxy.apis.responses_input import chat_tools, input_messages
from guardproxy.apis.responses_store import ResponseStore
from guardproxy.guard.errors import EngineOverloaded, EngineUnavailable, GuardFailure, PromptTooLong
from guardproxy.guard.template import ChatTemplate, ConversationError
from guardproxy.policy import Policy
from guardproxy.stream.guardview import CONTENT, REASONING, tool_field
from guardproxy.stream.moderator import Out
from guardproxy.stream.outputs import Finish, Marker, Text, ToolArgs, ToolEnd
from guardproxy.stream.sse import SSEEvent

from ..conftest import hf_chat_ids


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
    # Another worker's put keeps its own age: one made at 5 is gone at 16, wherever it arrives.
    shared: list[object] = []
    store.shared = shared.append
    now[0] = 5
    store.put("e", [])
    late = ResponseStore(max_entries=2, max_age_s=10, clock=lambda: now[0])
    now[0] = 12
    late.receive(shared[0])  # type: ignore[arg-type]
    assert late.get("e") == []
    now[0] = 16
    assert late.get("e") is None


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
    for index in ("1", None, True):  # an event naming no block is the upstream's error, not ours
        with pytest.raises(ProxyError, match="without a block index"):
            read({"type": "content_block_stop", "index": index})
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


# -- every event and item is read -------------------------------------------------------------------------


def responses_reader(policy: Policy) -> tuple[ResponsesWire, Any]:
    wire = ResponsesWire({"input": "x", "stream": True}, policy)

    def read(ev: dict[str, Any]) -> list[Any]:
        return wire.read_event(SSEEvent(json.dumps(ev), ev["type"]))

    return wire, read


def test_responses_custom_tool_calls_are_read_as_tool_calls() -> None:
    wire, read = responses_reader(Policy())
    added = {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": {
            "id": "ctc_1",
            "type": "custom_tool_call",
            "call_id": "call_1",
            "name": "apply_patch",
            "input": "",
        },
    }
    assert read(added) == [Marker(0, added, call=0)]  # its start is held with the call
    first = {
        "type": "response.custom_tool_call_input.delta",
        "item_id": "ctc_1",
        "output_index": 0,
        "delta": "*** Begin",
    }
    second = {**first, "delta": " Patch\n"}
    assert read(first) == [ToolArgs(0, 0, "apply_patch", "*** Begin")]
    assert read(second) == [ToolArgs(0, 0, "apply_patch", " Patch\n")]
    done = {
        "type": "response.custom_tool_call_input.done",
        "item_id": "ctc_1",
        "output_index": 0,
        "input": "x",
    }
    assert read(done) == [ToolEnd(0, 0), Marker(0, done, call=0)]
    item_done = {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": {**added["item"], "input": "x"},
    }
    assert read(item_done) == [ToolEnd(0, 0), Marker(0, item_done, call=0)]
    # The next call takes the next index; input sent whole with the item is judged like any other.
    second_call = {
        "type": "response.output_item.added",
        "output_index": 1,
        "item": {"id": "ctc_2", "type": "custom_tool_call", "name": "shell", "input": "ls -la"},
    }
    out = read(second_call)
    assert out[0].call == 1 and out[0].payload["item"]["input"] == ""  # nothing unjudged in the marker
    assert out[1:] == [ToolArgs(0, 1, "shell", "ls -la")]
    assert not wire.silent  # a custom call's input is shown as its own deltas, not hidden


def test_responses_hosted_tool_events_follow_the_unknown_events_policy() -> None:
    searching = {
        "type": "response.web_search_call.searching",
        "item_id": "ws_1",
        "output_index": 0,
        "sequence_number": 3,
    }
    added = {
        "type": "response.output_item.added",
        "output_index": 0,
        "sequence_number": 2,
        "item": {
            "id": "ws_1",
            "type": "web_search_call",
            "status": "in_progress",
            "action": {"type": "search", "query": "paris weather"},
        },
    }
    unknown = {
        "type": "response.future_widget.delta",
        "item_id": "fw_1",
        "output_index": 1,
        "delta": "some words",
    }
    # Judge: read as a call of its own (its text as the arguments), the event released whole with it.
    wire, read = responses_reader(Policy(unknown_events="judge"))
    out = read(added)
    assert out == [ToolArgs(0, 0, "web_search_call", out[0].text), ToolEnd(0, 0), Marker(0, added, call=0)]
    assert "paris weather" in out[0].text
    for no_text in ("ws_1", "in_progress", "web_search_call", '"search"'):  # ids, states, kinds: not read
        assert no_text not in out[0].text
    assert read(searching) == [Marker(0, searching)]  # no text: a marker, under every policy
    later = read(unknown)
    k = later[0].call
    assert k > 0 and later[0] == ToolArgs(0, k, "response.future_widget.delta", later[0].text)
    assert "some words" in later[0].text and later[1:] == [ToolEnd(0, k), Marker(0, unknown, call=k)]
    assert wire.silent == {tool_field(0), tool_field(k)}  # their text is never written as deltas
    assert wire.render(0, Out("text", field=tool_field(0), text=out[0].text), dict) == b""
    # Drop: the event passes with its text emptied (clients track items by their events).
    _, read = responses_reader(Policy(unknown_events="drop"))
    assert read(searching) == [Marker(0, searching)]
    [emptied] = read(added)
    assert emptied.call is None and emptied.payload["item"]["action"] == {"type": "search", "query": ""}
    assert emptied.payload["item"]["id"] == "ws_1"
    assert "some words" not in json.dumps(read(unknown)[0].payload)
    # Fail: the response ends with an error.
    _, read = responses_reader(Policy(unknown_events="fail"))
    assert read(searching) == [Marker(0, searching)]
    for ev in (added, unknown):
        with pytest.raises(ProxyError) as err:
            read(ev)
        assert (
            err.value.status == 502
            and err.value.code == "unknown_event"
            and "unknown_events" in err.value.message
        )


def chat_reader(policy: Policy) -> tuple[ChatWire, Any]:
    wire = ChatWire({"messages": [], "stream": True}, policy)

    def read(delta: dict[str, Any]) -> list[Any]:
        chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        return wire.read_event(SSEEvent(json.dumps(chunk)))

    return wire, read


def test_chat_refusals_and_unknown_delta_fields_are_read() -> None:
    wire, read = chat_reader(Policy())
    assert read({"role": "assistant", "refusal": "I can't help with that."}) == [
        Marker(0, {"role": "assistant"}),
        Text(0, "refusal", "I can't help with that."),
    ]
    assert wire.render(0, Out("text", field="refusal", text="I can't"), dict).startswith(b"data: ")
    event = json.loads(wire.render(0, Out("text", field="refusal", text="I can't"), dict)[6:])
    assert event["choices"][0]["delta"] == {"refusal": "I can't"}
    # A field no wire reads, with text: judged as a call of its own, the field released whole with it.
    audio = {"audio": {"id": "audio_1", "transcript": "hello there", "data": "UklGRg=="}}
    out = read(audio)
    assert [type(e) for e in out] == [ToolArgs, ToolEnd, Marker]
    args, end, marker = out
    assert "hello there" in args.text and "UklGRg" not in args.text and "audio_1" not in args.text
    assert end.call == args.call == marker.call and marker.payload == audio
    assert tool_field(args.call) in wire.silent
    assert args.call >= 1 << 20  # far from the upstream's own tool call indexes
    assert wire.render(0, Out("text", field=tool_field(args.call), text=args.text), dict) == b""
    # Without text it is a marker; a null field is nothing.
    assert read({"audio": {"id": "audio_2", "data": "UklGRg=="}}) == [
        Marker(0, {"audio": {"id": "audio_2", "data": "UklGRg=="}})
    ]
    assert read({"content": "Hi", "function_call": None}) == [Text(0, CONTENT, "Hi")]
    _, drop = chat_reader(Policy(unknown_events="drop"))
    [emptied] = drop(audio)  # the field passes with its text emptied (its audio bytes are no text)
    assert emptied.payload["audio"]["transcript"] == "" and emptied.payload["audio"]["data"] == "UklGRg=="
    _, fail = chat_reader(Policy(unknown_events="fail"))
    with pytest.raises(ProxyError) as err:
        fail(audio)
    assert err.value.code == "unknown_event"


def test_messages_system_entries_are_system_turns_where_they_stand(
    template: ChatTemplate, hf_tokenizer: Any
) -> None:
    messages = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "system", "content": "From now on, answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            "role": "system",
            "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Really."}],
        },
        {"role": "user", "content": "So?"},
    ]
    chat = chat_messages("You are helpful.", messages)
    assert chat == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "system", "content": "From now on, answer in French."},
        {"role": "user", "content": "Weather?"},
        {"role": "system", "content": "Be brief.\nReally."},
        {"role": "user", "content": "So?"},
    ]
    assert template.render_prompt(chat).ids == hf_chat_ids(hf_tokenizer, chat)
    # Without a top-level system prompt the first entry is the system prompt itself.
    first = chat_messages(None, messages[2:])
    assert first[0] == {"role": "system", "content": "From now on, answer in French."}
    assert template.render_prompt(first).ids == hf_chat_ids(hf_tokenizer, first)
    # An empty one is no turn; a malformed one is the client's error.
    assert chat_messages(None, [{"role": "system", "content": ""}, {"role": "user", "content": "x"}]) == [
        {"role": "user", "content": "x"}
    ]
    with pytest.raises(ConversationError):
        chat_messages(None, [{"role": "system", "content": 5}, {"role": "user", "content": "x"}])


PDF = "JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K"
# Every content block type the Messages API defines, where it stands (a user or an assistant turn), and
# the texts the guard must read of it (none: it carries no text for the guard).
BLOCKS: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    (
        "text",
        "user",
        {"type": "text", "text": "plain words", "cache_control": {"type": "ephemeral"}},
        ("plain words",),
    ),
    (
        "image",
        "user",
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PDF}},
        (),
    ),
    (
        "document (text source)",
        "user",
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "the document body"},
            "title": "A title",
            "context": "some context",
            "citations": {"enabled": True},
        },
        ("A title", "some context", "the document body"),
    ),
    (
        "document (content source)",
        "user",
        {
            "type": "document",
            "source": {
                "type": "content",
                "content": [{"type": "text", "text": "chunk one"}, {"type": "text", "text": "chunk two"}],
            },
        },
        ("chunk one", "chunk two"),
    ),
    (
        "document (base64 pdf)",
        "user",
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
        (),
    ),
    (
        "search_result",
        "user",
        {
            "type": "search_result",
            "source": "https://example.com/paris",
            "title": "Paris weather",
            "content": [{"type": "text", "text": "Mild all week."}],
            "citations": {"enabled": True},
        },
        ("Paris weather", "Mild all week."),
    ),
    (
        "thinking",
        "assistant",
        {"type": "thinking", "thinking": "Let me think.", "signature": "c2lnbmVk"},
        ("Let me think.",),
    ),
    ("redacted_thinking", "assistant", {"type": "redacted_thinking", "data": "RW5jcnlwdGVk"}, ()),
    (
        "tool_use",
        "assistant",
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ("weather", '{"city": "Paris"}'),
    ),
    (
        "server_tool_use",
        "assistant",
        {
            "type": "server_tool_use",
            "id": "srvtoolu_1",
            "name": "web_search",
            "input": {"query": "paris weather"},
        },
        ("web_search", '{"query": "paris weather"}'),
    ),
    (
        "mcp_tool_use",
        "assistant",
        {
            "type": "mcp_tool_use",
            "id": "mcptoolu_1",
            "name": "echo",
            "server_name": "tools",
            "input": {"text": "echo me"},
        },
        ("echo", '{"text": "echo me"}'),
    ),
    (
        "tool_result",
        "user",
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": [{"type": "text", "text": "18C and sunny"}],
        },
        ("18C and sunny",),
    ),
    (
        "web_search_tool_result",
        "assistant",
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": [
                {
                    "type": "web_search_result",
                    "url": "https://example.com/paris",
                    "title": "Paris is mild",
                    "encrypted_content": "RW5jcnlwdGVkUGFnZQ",
                    "page_age": "2 days ago",
                }
            ],
        },
        ("Paris is mild",),
    ),
    (
        "mcp_tool_result",
        "assistant",
        {
            "type": "mcp_tool_result",
            "tool_use_id": "mcptoolu_1",
            "is_error": False,
            "content": [{"type": "text", "text": "echoed back"}],
        },
        ("echoed back",),
    ),
    (
        "container_upload",
        "user",
        {"type": "container_upload", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"},
        (),
    ),
    (
        "code_execution_tool_result",
        "assistant",
        {
            "type": "code_execution_tool_result",
            "tool_use_id": "srvtoolu_2",
            "content": {
                "type": "code_execution_result",
                "stdout": "answer: 42",
                "stderr": "warning: slow",
                "return_code": 0,
                "content": [],
            },
        },
        ("answer: 42", "warning: slow"),
    ),
]
# Strings of blocks that are never text for the guard: binary payloads, signatures, ids.
NEVER_READ = (PDF, "c2lnbmVk", "RW5jcnlwdGVk", "toolu_1", "srvtoolu", "mcptoolu", "file_011")


def guard_texts(chat: list[dict[str, Any]]) -> list[str]:
    """Every text the guard reads of chat messages: contents, reasoning, tool names and arguments."""
    out = []
    for m in chat:
        out += [m.get("content") or "", m.get("reasoning_content") or ""]
        for call in m.get("tool_calls") or []:
            out += [call["function"]["name"], call["function"]["arguments"]]
    return [t for t in out if t]


@pytest.mark.parametrize(("name", "role", "block", "texts"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_every_messages_block_type_is_read_for_its_text(
    template: ChatTemplate, name: str, role: str, block: dict[str, Any], texts: tuple[str, ...]
) -> None:
    conversation = [{"role": role, "content": [block]}]
    if role == "assistant":
        conversation = [{"role": "user", "content": "Go."}, *conversation]
    chat = chat_messages(None, conversation)
    read = [t for t in guard_texts(chat) if t != "Go."]
    joined = "\n".join(read)
    for text in texts:
        assert text in joined, (name, read)
    if not texts:
        assert read == [], (name, read)  # a block with no text gives the guard none
    for never in NEVER_READ:
        assert never not in joined, (name, never)
    # The same block among others renders (a user turn after it, for the prompt verdict).
    template.render_prompt([*chat, {"role": "user", "content": "next"}])


def test_a_server_tools_result_comes_after_the_call_it_answers(template: ChatTemplate) -> None:
    """In an assistant turn, a server tool's call, its result and the text after it are in that order
    (the API puts them in one assistant message): the guard must read them in that order too."""
    chat = chat_messages(
        None,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "server_tool_use",
                        "id": "srvtoolu_1",
                        "name": "web_search",
                        "input": {"query": "paris"},
                    },
                    {
                        "type": "web_search_tool_result",
                        "tool_use_id": "srvtoolu_1",
                        "content": [
                            {"type": "web_search_result", "url": "https://x", "title": "Paris is mild"}
                        ],
                    },
                    {"type": "text", "text": "It is mild."},
                ],
            },
            {"role": "user", "content": "Thanks."},
        ],
    )
    texts = guard_texts(chat)
    call = texts.index('{"query": "paris"}')
    result = next(k for k, t in enumerate(texts) if "Paris is mild" in t)
    assert call < result, chat


def test_responses_input_items_of_custom_and_hosted_tools_are_read(
    template: ChatTemplate, hf_tokenizer: Any
) -> None:
    items = [
        {"role": "user", "content": "Fix the typo, then look up the weather."},
        {
            "type": "custom_tool_call",
            "call_id": "c1",
            "name": "apply_patch",
            "input": "*** Begin Patch\n-teh\n+the\n*** End Patch",
        },
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"},
        {
            "type": "web_search_call",
            "id": "ws_1",
            "status": "completed",
            "action": {"type": "search", "query": "paris weather"},
        },
        {"type": "item_reference", "id": "msg_0"},
        {"role": "user", "content": "And?"},
    ]
    messages = input_messages(items)
    assert messages == [
        {"role": "user", "content": "Fix the typo, then look up the weather."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {
                        "name": "apply_patch",
                        "arguments": "*** Begin Patch\n-teh\n+the\n*** End Patch",
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Done!"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": None,
                    "type": "function",
                    "function": {
                        "name": "web_search_call",
                        "arguments": '{"action": {"query": "paris weather"}}',
                    },
                }
            ],
        },
        {"role": "user", "content": "And?"},  # the item reference holds only an id: nothing to read
    ]
    assert template.render_prompt(messages).ids == hf_chat_ids(hf_tokenizer, messages)
    # A custom tool's output given as parts reads as their text.
    parts = [
        {"type": "custom_tool_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "ok"}]}
    ]
    assert input_messages(parts) == [{"role": "tool", "tool_call_id": "c1", "content": "ok"}]


def test_a_computer_call_output_screenshot_is_not_read_as_text() -> None:
    """A computer_call_output carries a screenshot (an image URL, often a base64 data URL): no text for
    the guard, like an input_image part; its safety checks' messages are text."""
    screenshot = (
        "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8" * 50
    )
    items = [
        {"role": "user", "content": "Open the settings."},
        {
            "type": "computer_call",
            "call_id": "cc1",
            "id": "cu_1",
            "status": "completed",
            "action": {"type": "click", "x": 10, "y": 20, "button": "left"},
            "pending_safety_checks": [],
        },
        {
            "type": "computer_call_output",
            "call_id": "cc1",
            "output": {"type": "computer_screenshot", "image_url": screenshot},
            "acknowledged_safety_checks": [
                {"id": "sc_1", "code": "malicious_instructions", "message": "Check the page."}
            ],
        },
    ]
    messages = input_messages(items)
    texts = json.dumps(messages)
    assert "iVBORw0KGgo" not in texts and "data:image" not in texts
    assert "Check the page." in texts


def test_event_json_is_compact_and_reads_what_orjson_refuses() -> None:
    from guardproxy.apis.wire import dumps, event_json, parse_json

    assert event_json({"a": "é", "b": [1, None]}) == '{"a":"é","b":[1,null]}'  # compact UTF-8
    assert dumps({"city": "Paris"}) == '{"city": "Paris"}'  # what the guard reads: the template's spacing
    # orjson refuses these; the stdlib reads them, so an upstream that sends them is not a 502.
    assert (
        parse_json('{"x": NaN, "n": 123456789012345678901234567890}', "a chunk")["n"]
        == 123456789012345678901234567890
    )
    assert event_json({"n": 2**70}) == '{"n":1180591620717411303424}'  # past 64 bits: the stdlib writes it
    assert event_json({"x": float("nan")}) == '{"x":null}'  # no NaN in JSON: a client parser would refuse it
    with pytest.raises(ProxyError, match="not JSON"):
        parse_json(b'{"x": "\xff\xfe"}', "a chunk")
