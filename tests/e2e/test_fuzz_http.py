"""Hostile input on the HTTP surface: whatever the body, a 4xx in the shape of the route's API (OpenAI's,
Anthropic's on /v1/messages) or a normal answer, never a 500, and the server keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import FakeUpstream, wait_idle

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
content = st.one_of(
    st.text(max_size=60),
    st.none(),
    json_values,
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "refusal", "input_audio", "x"])},
            optional={"text": json_values, "refusal": json_values},
        ),
        max_size=4,
    ),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "function", "root", ""])},
    optional={
        "content": content,
        "tool_calls": json_values,
        "reasoning_content": json_values,
        "name": json_values,
    },
)
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=6), json_values)},
    optional={
        "model": json_values,
        "stream": json_values,
        "n": st.one_of(st.integers(-5, 100), json_values),
        "max_tokens": st.integers(-(2**40), 2**40),
        "temperature": json_values,
    },
)
input_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "refusal", "input_image", "summary_text", "x"])},
    optional={"text": json_values, "refusal": json_values},
)
input_item = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "message",
                "function_call",
                "function_call_output",
                "reasoning",
                "item_reference",
                "",
                "custom_tool_call",
                "custom_tool_call_output",
                "web_search_call",
                "computer_call_output",
                "mcp_list_tools",
                "future_item_call",
            ]
        )
    },
    optional={
        "input": json_values,
        "action": json_values,
        "id": json_values,
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]),
        "content": st.one_of(st.text(max_size=30), st.lists(input_part, max_size=3), json_values),
        "name": json_values,
        "arguments": json_values,
        "call_id": json_values,
        "output": st.one_of(st.text(max_size=30), st.lists(input_part, max_size=3), json_values),
        "summary": st.one_of(st.lists(input_part, max_size=3), json_values),
    },
)
responses_body = st.fixed_dictionaries(
    {"input": st.one_of(st.text(max_size=40), st.lists(input_item, max_size=5), json_values)},
    optional={
        "model": json_values,
        "stream": json_values,
        "instructions": json_values,
        "tools": st.one_of(
            st.lists(
                st.fixed_dictionaries({"type": st.just("function")}, optional={"name": json_values}),
                max_size=2,
            ),
            json_values,
        ),
        "previous_response_id": json_values,
        "background": json_values,
    },
)
block = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "text",
                "tool_use",
                "tool_result",
                "thinking",
                "image",
                "document",
                "x",
                "server_tool_use",
                "mcp_tool_use",
                "web_search_tool_result",
                "mcp_tool_result",
                "code_execution_tool_result",
                "search_result",
                "redacted_thinking",
                "container_upload",
            ]
        )
    },
    optional={
        "source": json_values,
        "title": json_values,
        "context": json_values,
        "text": json_values,
        "thinking": json_values,
        "name": json_values,
        "input": json_values,
        "id": json_values,
        "tool_use_id": json_values,
        "content": st.one_of(st.text(max_size=20), json_values),
    },
)
anthropic_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", ""])},
    optional={"content": st.one_of(st.text(max_size=40), st.lists(block, max_size=4), json_values)},
)
messages_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(anthropic_message, max_size=5), json_values)},
    optional={
        "model": json_values,
        "max_tokens": st.integers(-5, 2**40),
        "stream": json_values,
        "system": st.one_of(st.text(max_size=30), st.lists(block, max_size=2), json_values),
        "tools": st.one_of(
            st.lists(
                st.fixed_dictionaries({"name": json_values}, optional={"input_schema": json_values}),
                max_size=2,
            ),
            json_values,
        ),
    },
)
completion_body = st.fixed_dictionaries(
    {"prompt": json_values}, optional={"stream": json_values, "n": json_values}
)
moderation_body = st.fixed_dictionaries({"input": json_values})
raw_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(b"[" * 50_000 + b"]" * 50_000),  # nesting past the parser's recursion limit
    st.just(b'{"messages": [' + b'{"role": "user", "content": "x"},' * 5000 + b"{}]}"),
)


def post(url: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def check(status: int, body: bytes, anthropic: bool = False) -> None:
    assert status in (200, 400, 413, 429), (status, body[:300])
    if status != 200:
        parsed = json.loads(body)
        if anthropic:
            assert parsed["type"] == "error" and isinstance(parsed["error"]["type"], str)
        err = parsed["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(body=chat_body)
def test_chat_bodies(proxy: str, fake: FakeUpstream, body: dict[str, Any]) -> None:
    check(*post(proxy + "/chat/completions", json.dumps(body).encode()))


@SETTINGS
@given(body=completion_body)
def test_completion_bodies(proxy: str, fake: FakeUpstream, body: dict[str, Any]) -> None:
    check(*post(proxy + "/completions", json.dumps(body).encode()))


@SETTINGS
@given(body=responses_body)
def test_responses_bodies(proxy: str, fake: FakeUpstream, body: dict[str, Any]) -> None:
    check(*post(proxy + "/responses", json.dumps(body).encode()))


@SETTINGS
@given(body=messages_body)
def test_messages_bodies(proxy: str, fake: FakeUpstream, body: dict[str, Any]) -> None:
    check(*post(proxy + "/messages", json.dumps(body).encode()), anthropic=True)


@SETTINGS
@given(body=moderation_body)
def test_moderation_bodies(proxy: str, body: dict[str, Any]) -> None:
    check(*post(proxy + "/moderations", json.dumps(body).encode()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=raw_bodies,
    path=st.sampled_from(["/chat/completions", "/completions", "/moderations", "/responses", "/messages"]),
)
def test_raw_bodies(proxy: str, fake: FakeUpstream, data: bytes, path: str) -> None:
    check(*post(proxy + path, data), anthropic=path == "/messages")


def test_still_serving_after_the_fuzz(proxy: str, fake: FakeUpstream) -> None:
    status, body = post(
        proxy + "/chat/completions",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode(),
    )
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello there!"


# -- the upstream's events: new kinds, random splits --------------------------------------------------------

# Text the guard judges: " bomb" (a token of its own after a space) is the trigger.
WORDS = [" The", " weather", " is", " mild", " a", " bomb", " ok", ".", " 日本"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(lambda w: "Note:" + "".join(w))
event_names = st.sampled_from(
    [
        "response.future_widget.delta",
        "response.web_search_call.searching",
        "response.mcp_call.arguments.delta",
    ]
)
# An unknown event: its text under a key the wire does not know, ids and states around it.
unknown_payloads = st.fixed_dictionaries(
    {"item_id": st.just("x_1"), "output_index": st.integers(0, 3)},
    optional={"delta": texts, "query": texts, "nested": st.fixed_dictionaries({"note": texts})},
)
network = st.fixed_dictionaries(
    {
        "split_seed": st.integers(0, 2**16),
        "keepalive": st.booleans(),
        "crlf": st.booleans(),
        "multiline": st.booleans(),
    }
)


def stream_post(url: str, body: dict[str, Any], script: dict[str, Any]) -> tuple[int, str]:
    req = urllib.request.Request(
        url,
        data=json.dumps({**body, "stream": True}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "x-fake-script": json.dumps(script)},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def sse_data(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
        if data and data != "[DONE]":
            out.append(json.loads(data))
    return out


EVENT_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@EVENT_SETTINGS
@given(
    patch=st.lists(texts, min_size=1, max_size=4),
    unknown=st.lists(st.tuples(event_names, unknown_payloads), max_size=3),
    net=network,
)
def test_responses_custom_tool_calls_and_unknown_events_in_random_splits(
    proxy: str,
    fake: FakeUpstream,
    patch: list[str],
    unknown: list[tuple[str, dict[str, Any]]],
    net: dict[str, Any],
) -> None:
    extra = [[name, {"type": name, **payload}] for name, payload in unknown]
    script = {
        "pieces": [["Fine", "."]],
        "tool_args": patch,
        "tool_kind": "custom",
        "extra_events": extra,
        **net,
    }
    status, text = stream_post(proxy + "/responses", {"model": "m", "input": "hi"}, script)
    assert status == 200
    events = sse_data(text)
    trigger = " bomb" in "".join(patch) + json.dumps(extra)
    assert "bomb" not in text
    last = events[-1]
    assert last["type"] == ("response.incomplete" if trigger else "response.completed"), last
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    if not trigger:  # everything judged Safe goes out whole: the call's input, each unknown event
        (done,) = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
        assert done["input"] == "".join(patch)
        assert [e["type"] for e in events if e["type"] in {n for n, _ in unknown}] == [n for n, _ in unknown]


@EVENT_SETTINGS
@given(
    fields=st.lists(st.tuples(st.sampled_from(["audio", "future_field", "annotations"]), texts), max_size=3),
    args=st.lists(texts, max_size=3),
    net=network,
)
def test_chat_unknown_delta_fields_and_tool_calls_in_random_splits(
    proxy: str, fake: FakeUpstream, fields: list[tuple[str, str]], args: list[str], net: dict[str, Any]
) -> None:
    extra = [
        [
            "",
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {key: {"transcript": t}}}],
            },
        ]
        for key, t in fields
    ]
    script = {
        "pieces": [["Fine", "."]],
        "tool_args": [json.dumps({"q": "".join(args)})] if args else [],
        **net,
    }
    script["extra_events"] = extra
    status, text = stream_post(
        proxy + "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, script
    )
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    chunks = sse_data(text)
    trigger = " bomb" in "".join(args) + "".join(t for _, t in fields)
    assert "bomb" not in text
    finishes = [
        c["finish_reason"] for ch in chunks for c in ch.get("choices") or [] if c.get("finish_reason")
    ]
    assert finishes == (["content_filter"] if trigger else ["tool_calls" if args else "stop"])


@EVENT_SETTINGS
@given(
    unknown=st.lists(
        st.tuples(st.sampled_from(["future_event", "server_notice"]), unknown_payloads), max_size=3
    ),
    tool=st.lists(texts, max_size=3),
    net=network,
)
def test_messages_unknown_events_and_tool_use_in_random_splits(
    proxy: str,
    fake: FakeUpstream,
    unknown: list[tuple[str, dict[str, Any]]],
    tool: list[str],
    net: dict[str, Any],
) -> None:
    extra = [[name, {"type": name, **payload}] for name, payload in unknown]
    args = [json.dumps({"q": "".join(tool)})] if tool else []
    script = {"pieces": [["Fine", "."]], "tool_args": args, "extra_events": extra, **net}
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    status, text = stream_post(proxy + "/messages", body, script)
    assert status == 200
    events = sse_data(text)
    trigger = " bomb" in "".join(tool) + json.dumps(extra)
    assert "bomb" not in text
    assert events[-1]["type"] == "message_stop"
    stop = [e for e in events if e["type"] == "message_delta"][-1]["delta"]["stop_reason"]
    assert stop == ("refusal" if trigger else "tool_use" if tool else "end_turn")


def released_text(events: list[dict[str, Any]]) -> str:
    """The answer's text in the events of any of the three APIs."""
    out = ""
    for e in events:
        if e.get("type") == "response.output_text.delta":
            out += e["delta"]
        elif e.get("type") == "content_block_delta" and e["delta"].get("type") == "text_delta":
            out += e["delta"]["text"]
        for c in e.get("choices") or []:
            out += (c.get("delta") or {}).get("content") or ""
    return out


@pytest.mark.parametrize("path", ["/responses", "/chat/completions", "/messages"])
def test_still_serving_after_the_event_fuzz(proxy: str, fake: FakeUpstream, path: str) -> None:
    wait_idle(proxy)  # every guard stream of the fuzzed answers was returned
    body = {"model": "m", "max_tokens": 8, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}
    status, text = stream_post(proxy + path, body, {"pieces": [["Hello", " there", "!"]]})
    assert status == 200 and released_text(sse_data(text)) == "Hello there!"
