"""Hostile input on the HTTP surface: whatever the body, a 4xx in the shape of the route's API (OpenAI's,
Anthropic's on /v1/messages) or a normal answer, never a 500, and the server keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import FakeUpstream

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
            ["message", "function_call", "function_call_output", "reasoning", "item_reference", ""]
        )
    },
    optional={
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
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "thinking", "image", "document", "x"])},
    optional={
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
