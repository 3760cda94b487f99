"""The Anthropic Messages API end to end: the real anthropic client (sync, async, the stream helper) ->
guardproxy (trigger guard: "bomb"/"grenade" Unsafe, "gun" Controversial) -> a fake upstream replaying
the Messages API's event sequence in random network splits."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from guardproxy.config import AuthSettings, key_hash
from guardproxy.guard.limits import EngineLimits

from .conftest import proxy_settings
from .harness import (
    FakeUpstream,
    Loopback,
    Script,
    engine_state,
    http_json,
    start_proxy,
    start_proxy_app,
    until,
    wait_idle,
)

BENIGN = ["The", " weather", " in", " Paris", " is", " mild", ";", " 日本語", " too", ".", "\n", "Bye", "!"]
TRIGGER = ["Sure", ",", " take", " a", " bomb", " and", " go", "."]
CUT = "Sure, take a [cut]"  # the proxy's notice is " [cut]" (tests/e2e/conftest.py)
USER = [{"role": "user", "content": "Tell me about the weather."}]


def openai_client(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy, api_key="k", max_retries=0, timeout=60)


def client(proxy: str, key: str = "sk-ant-client") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.removesuffix("/v1"), api_key=key, max_retries=0, timeout=60)


def stream(proxy: str, **kw: Any) -> list[Any]:
    kw.setdefault("messages", USER)
    with client(proxy) as c:
        return list(c.messages.create(model="m", max_tokens=64, stream=True, **kw))


def text_of(events: list[Any], kind: str = "text_delta") -> str:
    key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}[kind]
    return "".join(
        getattr(e.delta, key) for e in events if e.type == "content_block_delta" and e.delta.type == kind
    )


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_benign_text_passes_unchanged(proxy: str, fake: FakeUpstream, seed: int | None) -> None:
    fake.script = Script(
        pieces=[BENIGN], reasoning=["Think", " first."], tool_args=['{"city": ', '"Paris"}'], split_seed=seed
    )
    events = stream(proxy)
    assert text_of(events) == "".join(BENIGN)
    assert text_of(events, "thinking_delta") == "Think first."
    assert text_of(events, "input_json_delta") == '{"city": "Paris"}'
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert any(e.type == "content_block_delta" and e.delta.type == "signature_delta" for e in events)
    assert events[-2].delta.stop_reason == "tool_use"
    # Events the SDK drops (ping) pass too, in order: read the raw stream.
    fake.script = Script(pieces=[BENIGN], split_seed=seed)
    names = raw_names(proxy)
    assert names[:3] == ["message_start", "content_block_start", "ping"] and names[-1] == "message_stop"


def test_the_stream_helper_the_async_client_and_whole_messages(proxy: str, fake: FakeUpstream) -> None:
    fake.script = Script(pieces=[BENIGN], reasoning=["Think."])
    with client(proxy) as c, c.messages.stream(model="m", max_tokens=64, messages=USER) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "".join(BENIGN) and final.stop_reason == "end_turn"
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[1].text == text

    async def run() -> tuple[str, str]:
        async with anthropic.AsyncAnthropic(
            base_url=proxy.removesuffix("/v1"), api_key="k", max_retries=0
        ) as ac:
            async with ac.messages.stream(model="m", max_tokens=64, messages=USER) as s:
                streamed = (await s.get_final_message()).content[0]
            whole = (await ac.messages.create(model="m", max_tokens=64, messages=USER)).content[0]
            assert streamed.type == whole.type == "text"
            return streamed.text, whole.text

    fake.script = Script(pieces=[BENIGN])
    assert asyncio.run(run()) == ("".join(BENIGN), "".join(BENIGN))


@pytest.mark.parametrize("seed", [None, 3])
def test_a_trigger_in_the_answer_is_cut_with_nothing_of_it_released(
    proxy: str, fake: FakeUpstream, seed: int | None
) -> None:
    fake.script = Script(pieces=[TRIGGER], split_seed=seed)
    with client(proxy) as c, c.messages.stream(model="m", max_tokens=64, messages=USER) as s:
        events = list(s)
        final = s.get_final_message()
    assert final.stop_reason == "refusal" and final.content[0].type == "text" and final.content[0].text == CUT
    assert [e.type for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "bomb" not in json.dumps([e.model_dump() for e in events])
    fake.script = Script(pieces=[TRIGGER])
    with client(proxy) as c:
        whole = c.messages.create(model="m", max_tokens=64, messages=USER)
    assert whole.stop_reason == "refusal" and whole.content[0].type == "text" and whole.content[0].text == CUT


@pytest.mark.parametrize(
    ("where", "script", "kind"),
    [
        (
            "tool_use",
            Script(pieces=[["Calling."]], tool_args=['{"what": "a', " bomb", ' now"}']),
            "input_json_delta",
        ),
        ("thinking", Script(pieces=[["Fine."]], reasoning=["Plan: a", " bomb", " here"]), "thinking_delta"),
    ],
)
def test_a_trigger_outside_the_text_is_cut_too(
    proxy: str, fake: FakeUpstream, where: str, script: Script, kind: str
) -> None:
    fake.script = script
    with client(proxy) as c, c.messages.stream(model="m", max_tokens=64, messages=USER) as s:
        events = list(s)
        final = s.get_final_message()
    assert final.stop_reason == "refusal", where
    assert "bomb" not in json.dumps([e.model_dump() for e in events]) and "bomb" not in text_of(events, kind)


@pytest.mark.parametrize(
    "request_body",
    [
        {"system": "Explain any bomb you are asked about.", "messages": USER},
        {"system": [{"type": "text", "text": "About the grenade."}], "messages": USER},
        {
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": [{"type": "text", "text": "A grenade, then."}]},
                {"role": "user", "content": "more"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Look it up."},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "grenade specs"}],
                },
            ]
        },
        {
            "messages": USER,
            "tools": [
                {"name": "arsenal", "description": "Builds a bomb.", "input_schema": {"type": "object"}}
            ],
        },
    ],
    ids=["system", "system-blocks", "earlier-turn", "tool-result", "tools"],
)
def test_prompt_triggers_anywhere_are_blocked(
    proxy: str, fake: FakeUpstream, request_body: dict[str, Any]
) -> None:
    fake.script = Script(pieces=[BENIGN])
    with client(proxy) as c, pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(model="m", max_tokens=64, **request_body)
    assert err.value.status_code == 400 and err.value.body is not None
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    assert "blocked by the content policy" in err.value.body["error"]["message"]


def raw(
    proxy: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        proxy.removesuffix("/v1") + path,
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return http_json(req)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{not json", 400, "invalid_request_error"),
        (json.dumps({"model": "m", "max_tokens": 5}).encode(), 400, "invalid_request_error"),
        (
            json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "invalid_request_error",
        ),
        (json.dumps({"model": "m", "messages": "hi"}).encode(), 400, "invalid_request_error"),
        (json.dumps({"model": 5, "messages": USER}).encode(), 400, "invalid_request_error"),
    ],
)
def test_bad_bodies_get_anthropic_errors(
    proxy: str, fake: FakeUpstream, body: bytes, status: int, kind: str
) -> None:
    before = len(fake.seen)
    got, err = raw(proxy, "/v1/messages", body)
    assert (
        got == status and err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"]
    )
    assert fake.seen[before:] == []


def test_every_failure_on_the_route_is_anthropic_shaped(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    fake, url = upstream
    # Upstream down: 502, api_error, and the SDK's own exception for it.
    down = start_proxy(loopback, proxy_settings("http://127.0.0.1:9/v1", trigger_checkpoint))
    with client(down) as c, pytest.raises(anthropic.APIStatusError) as err:
        c.messages.create(model="m", max_tokens=8, messages=USER)
    assert err.value.status_code == 502 and err.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    # An upstream's own Anthropic error is relayed as it is.
    proxy = start_proxy(loopback, proxy_settings(url, trigger_checkpoint))
    fake.script = Script(
        status=529, error_body=b'{"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}'
    )
    with client(proxy) as c, pytest.raises(anthropic.APIStatusError) as relayed:
        c.messages.create(model="m", max_tokens=8, messages=USER)
    assert relayed.value.status_code == 529 and relayed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    # Mid-stream: the upstream's error event ends the stream as Anthropic's error event.
    fake.script = Script(pieces=[BENIGN], fault="error-event", fault_after=5)
    with client(proxy) as c, pytest.raises(anthropic.APIStatusError) as mid:
        list(c.messages.create(model="m", max_tokens=8, messages=USER, stream=True))
    assert "model crashed" in str(mid.value)
    # The guard full: 429 rate_limit_error with Retry-After.
    tiny = EngineLimits(max_streams=1, max_queue=0, response_reserve=256, anchor_tokens=256)
    busy = start_proxy(loopback, proxy_settings(url, trigger_checkpoint, engine=tiny))
    fake.script = Script(pieces=[BENIGN])
    body = json.dumps({"model": "m", "max_tokens": 8, "messages": USER}).encode()
    slow = {"x-fake-script": json.dumps({"pieces": [["ok"]], "first_delay": 2.0})}
    status: dict[str, int] = {}
    holder = threading.Thread(
        target=lambda: status.update(first=raw(busy, "/v1/messages", body, slow)[0]), name="hold-the-guard"
    )
    holder.start()
    deadline = time.monotonic() + 10
    while engine_state(busy)["active_streams"] < 1:  # until it holds the guard's only stream
        assert time.monotonic() < deadline, "the first request never reached the guard"
        time.sleep(0.01)
    got, err_body = raw(busy, "/v1/messages", body)
    assert got == 429 and err_body["error"]["type"] == "rate_limit_error"
    holder.join(30)
    assert status["first"] == 200
    wait_idle(busy)


def raw_names(proxy: str) -> list[str]:
    """The event names of a raw streamed answer."""
    body = json.dumps({"model": "m", "max_tokens": 8, "messages": USER, "stream": True}).encode()
    req = urllib.request.Request(proxy + "/messages", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return [line[7:] for line in r.read().decode().splitlines() if line.startswith("event: ")]


def test_x_api_key_authenticates_and_headers_pass_through(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    fake, url = upstream
    base = proxy_settings(url, trigger_checkpoint)
    settings = replace(
        base,
        auth=AuthSettings((key_hash("sk-guard-1"),)),
        upstream=replace(base.upstream, api_key="sk-upstream"),
    )
    proxy = start_proxy(loopback, settings)
    fake.script = Script(pieces=[BENIGN])
    with client(proxy, "sk-guard-1") as c:
        msg = c.messages.create(
            model="m", max_tokens=8, messages=USER, extra_headers={"anthropic-beta": "test-2025"}
        )
    assert msg.content[0].type == "text" and msg.content[0].text == "".join(BENIGN)
    sent = {k.lower(): v for k, v in fake.headers[-1].items()}
    assert sent["x-api-key"] == "sk-upstream" and sent["authorization"] == "Bearer sk-upstream"
    assert sent["anthropic-version"] and sent["anthropic-beta"] == "test-2025"
    with client(proxy, "sk-wrong") as c, pytest.raises(anthropic.AuthenticationError) as err:
        c.messages.create(model="m", max_tokens=8, messages=USER)
    assert err.value.body["type"] == "error"  # type: ignore[index]
    # Anthropic's own header: the anthropic SDK sends a bearer token to other hosts, other clients send
    # x-api-key; guardproxy takes either.
    body = json.dumps({"model": "m", "max_tokens": 8, "messages": USER}).encode()
    assert raw(proxy, "/v1/messages", body, {"x-api-key": "sk-guard-1"})[0] == 200
    assert raw(proxy, "/v1/messages", body, {"x-api-key": "sk-wrong"})[0] == 401
    # Without keys of its own, guardproxy forwards the client's key as it came.
    open_proxy = start_proxy(loopback, proxy_settings(url, trigger_checkpoint))
    with client(open_proxy, "sk-ant-client") as c:
        tokens = c.messages.count_tokens(model="m", messages=USER)
    assert tokens.input_tokens > 0 and fake.seen[-1] == ("POST", "/v1/messages/count_tokens")
    forwarded = {k.lower(): v for k, v in fake.headers[-1].items()}
    assert "sk-ant-client" in (
        forwarded.get("x-api-key"),
        forwarded.get("authorization", "").removeprefix("Bearer "),
    )
    assert raw(open_proxy, "/v1/messages/count_tokens", body, {"x-api-key": "sk-raw"})[0] == 200
    assert {k.lower(): v for k, v in fake.headers[-1].items()}["x-api-key"] == "sk-raw"


def test_policy_routes_metrics_and_audit_know_the_route(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path, tmp_path: Path
) -> None:
    from guardproxy.config import PolicyRoute

    from .test_metrics import scrape, value

    fake, url = upstream
    base = proxy_settings(url, trigger_checkpoint)
    named = replace(base.policy, name="for-claude", notice=" [withheld]")
    settings = replace(
        base,
        policies={"for-claude": named},
        routes=(PolicyRoute(policy="for-claude", route="/v1/messages"),),
        audit=replace(base.audit, path=str(tmp_path / "audit.jsonl")),
    )
    proxy = start_proxy(loopback, settings)
    fake.script = Script(pieces=[TRIGGER])
    with client(proxy) as c:
        msg = c.messages.create(model="m", max_tokens=8, messages=USER)
    assert msg.content[0].type == "text" and msg.content[0].text == "Sure, take a [withheld]"
    assert value(scrape(proxy), "guardproxy_requests_total", route="/v1/messages", status="200") == 1
    audit = tmp_path / "audit.jsonl"  # the record is written as the exchange ends
    until(lambda: audit.exists() and bool(audit.read_text().strip()), 10, "no audit record")
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (record["route"], record["policy"], record["outcome"]) == ("/v1/messages", "for-claude", "cut")


def test_a_refused_prompt_and_a_failed_guard_in_the_apis_own_shapes(
    loopback: Loopback, upstream: tuple[FakeUpstream, str], trigger_checkpoint: Path
) -> None:
    url = upstream[1]
    refusing = start_proxy(
        loopback, proxy_settings(url, trigger_checkpoint, blocked_prompt="refusal", refusal="No.")
    )
    bad = [{"role": "user", "content": "How to build a bomb?"}]
    with client(refusing) as c:
        whole = c.messages.create(model="m", max_tokens=8, messages=bad)
        with c.messages.stream(model="m", max_tokens=8, messages=bad) as s:
            streamed = s.get_final_message()
    for m in (whole, streamed):
        assert m.stop_reason == "refusal" and m.content[0].type == "text" and m.content[0].text == "No."
    with openai_client(refusing) as oc:
        r = oc.responses.create(model="m", input="How to build a bomb?")
        with oc.responses.stream(model="m", input="How to build a bomb?") as s:
            final = s.get_final_response()
    assert r.status == final.status == "completed" and r.output_text == final.output_text == "No."
    # The guard fails (fail_closed): 503 in Anthropic's shape on /v1/messages.
    from .test_guard_failure import Breaker

    proxy, app = start_proxy_app(loopback, proxy_settings(url, trigger_checkpoint))
    breaker = Breaker(app)
    breaker.arm(0)
    try:
        with client(proxy) as c, pytest.raises(anthropic.InternalServerError) as err:
            c.messages.create(model="m", max_tokens=8, messages=USER)
        assert err.value.status_code == 503 and err.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        assert "guard" in err.value.body["error"]["message"]  # type: ignore[index]
    finally:
        breaker.disarm()
