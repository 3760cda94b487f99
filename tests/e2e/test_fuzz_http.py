"""Hostile input on the HTTP surface: whatever the body, an OpenAI-shaped 4xx (or a normal answer),
never a 500, and the server keeps serving."""

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


def check(status: int, body: bytes) -> None:
    assert status in (200, 400, 413, 429), (status, body[:300])
    if status != 200:
        err = json.loads(body)["error"]
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
@given(body=moderation_body)
def test_moderation_bodies(proxy: str, body: dict[str, Any]) -> None:
    check(*post(proxy + "/moderations", json.dumps(body).encode()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=raw_bodies, path=st.sampled_from(["/chat/completions", "/completions", "/moderations"]))
def test_raw_bodies(proxy: str, fake: FakeUpstream, data: bytes, path: str) -> None:
    check(*post(proxy + path, data))


def test_still_serving_after_the_fuzz(proxy: str, fake: FakeUpstream) -> None:
    status, body = post(
        proxy + "/chat/completions",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode(),
    )
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello there!"
